//! One file per network.
