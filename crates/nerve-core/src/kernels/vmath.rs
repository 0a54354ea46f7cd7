//! Temporary scalar math (replaced by the vectorised implementation).
#![allow(missing_docs)]
pub fn exp(x: f32) -> f32 {
    x.exp()
}
pub fn ln(x: f32) -> f32 {
    x.ln()
}
pub fn tanh(x: f32) -> f32 {
    x.tanh()
}
pub fn erf(x: f32) -> f32 {
    crate::dtype::erf_f64(x as f64) as f32
}
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}
