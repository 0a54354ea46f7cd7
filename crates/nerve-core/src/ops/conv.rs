//! Convolutions and pooling (in progress).
