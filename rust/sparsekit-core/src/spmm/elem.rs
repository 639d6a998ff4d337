//! Element types of the block-sparse kernels' operands: `f32`, and float16 / bfloat16 read as raw bits
//! (`half::f16` / `half::bf16`, 16-bit `Pod` types, so a binding reinterprets `int16` buffers in place).
//!
//! The arithmetic is always f32: half operands are widened (exactly: every f16 / bf16 is an f32) panel
//! by panel as the drivers need them, the products are accumulated by the f32 micro-kernels, and a half
//! result is rounded once, to nearest even, when a finished tile leaves the task.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// An operand type of the kernels.
pub trait Elem: Copy + Send + Sync + 'static {
    /// Zero (written for empty products).
    const ZERO: Self;
    /// The slice itself when it already holds f32 (the kernels then read and write it in place).
    fn as_f32(s: &[Self]) -> Option<&[f32]>;
    /// As [`Elem::as_f32`], writable.
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]>;
    /// One element as f32 (exact).
    fn to_f32(self) -> f32;
    /// `dst[i] = src[i]` as f32 (exact). Lengths must match.
    fn widen(src: &[Self], dst: &mut [f32]);
    /// `dst[i] = src[i]` rounded to nearest even (what torch's `.to(dtype)` does). Lengths must match.
    fn narrow(src: &[f32], dst: &mut [Self]);
}

impl Elem for f32 {
    const ZERO: f32 = 0.0;
    fn as_f32(s: &[f32]) -> Option<&[f32]> {
        Some(s)
    }
    fn as_f32_mut(s: &mut [f32]) -> Option<&mut [f32]> {
        Some(s)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    fn widen(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn narrow(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl Elem for f16 {
    const ZERO: f16 = f16::ZERO;
    fn as_f32(_: &[f16]) -> Option<&[f32]> {
        None
    }
    fn as_f32_mut(_: &mut [f16]) -> Option<&mut [f32]> {
        None
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    // `half` converts slices with F16C (vcvtph2ps / vcvtps2ph, round to nearest even) when the CPU has it
    // (runtime detection), in software otherwise: the same bits either way.
    fn widen(src: &[f16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    fn narrow(src: &[f32], dst: &mut [f16]) {
        dst.convert_from_f32_slice(src);
    }
}

impl Elem for bf16 {
    const ZERO: bf16 = bf16::ZERO;
    fn as_f32(_: &[bf16]) -> Option<&[f32]> {
        None
    }
    fn as_f32_mut(_: &mut [bf16]) -> Option<&mut [f32]> {
        None
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    // bfloat16 is the top half of an f32: widening is a shift, which the compiler vectorises.
    fn widen(src: &[bf16], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len());
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }
    // Round to nearest even by integer arithmetic (branch-free, so it vectorises); NaN stays a quiet NaN
    // of the same sign. Equal to `bf16::from_f32` bit for bit (tested).
    fn narrow(src: &[f32], dst: &mut [bf16]) {
        assert_eq!(src.len(), dst.len());
        for (d, s) in dst.iter_mut().zip(src) {
            let x = s.to_bits();
            let rounded = (x.wrapping_add(0x7fff + ((x >> 16) & 1))) >> 16;
            let nan = (x & 0x7fff_ffff) > 0x7f80_0000;
            *d = bf16::from_bits(if nan { (x >> 16) as u16 | 0x0040 } else { rounded as u16 });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_match_the_half_crate_bit_for_bit() {
        // Every 16-bit pattern widens exactly, and narrowing a spread of f32 patterns (ties, subnormals,
        // overflow to infinity, NaN) rounds as `half` does element by element.
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let h: Vec<f16> = all.iter().map(|&b| f16::from_bits(b)).collect();
        let b: Vec<bf16> = all.iter().map(|&b| bf16::from_bits(b)).collect();
        let mut wide = vec![0f32; all.len()];
        f16::widen(&h, &mut wide);
        for (x, w) in h.iter().zip(&wide) {
            assert_eq!(x.to_f32().to_bits(), w.to_bits(), "{x:?}");
        }
        bf16::widen(&b, &mut wide);
        for (x, w) in b.iter().zip(&wide) {
            assert_eq!(bf16::to_f32(*x).to_bits(), w.to_bits(), "{x:?}");
        }
        let mut seed = 1u64;
        let mut pats: Vec<u32> = vec![0, 0x8000_0000, 0x7f80_0000, 0xff80_0000, 0x7fc0_0001, 0x7f7f_ffff, 0x0000_8000,
                                      0x3f80_8000, 0x3f81_8000, 0x3f80_8001, 0x387f_e000, 0x4780_0000];
        for _ in 0..200_000 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            pats.push((seed >> 32) as u32);
        }
        let src: Vec<f32> = pats.iter().map(|&p| f32::from_bits(p)).collect();
        let mut hb = vec![f16::ZERO; src.len()];
        let mut bb = vec![bf16::ZERO; src.len()];
        f16::narrow(&src, &mut hb);
        bf16::narrow(&src, &mut bb);
        for (i, &s) in src.iter().enumerate() {
            assert_eq!(hb[i].to_bits(), f16::from_f32(s).to_bits(), "f16 of {:#x}", pats[i]);
            assert_eq!(bb[i].to_bits(), bf16::from_f32(s).to_bits(), "bf16 of {:#x}", pats[i]);
        }
    }
}
