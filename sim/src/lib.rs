//! Deterministic simulator (not built yet: see README "Status").
