//! Goose load generator (not built yet: see README "Status").
