//! Order-preserving integer keys for floating-point scores.
//!
//! IEEE floats (and bf16) are sign-magnitude, so their bits sort like unsigned integers once the sign is
//! handled: `|x|` orders as the bits with the sign cleared, and `x` orders as `bits | SIGN` for
//! non-negative values and `!bits` for negative ones. Radix selection then runs on plain integers.
//! Consequences worth knowing: for `Order::Value`, -0.0 ranks just below +0.0; for `Order::Abs` they
//! are equal. NaN is rejected before keys are compared.

use half::{bf16, f16};

/// Which score a selection ranks by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Rank by magnitude `|x|` (pruning masks).
    Abs,
    /// Rank by signed value `x` (order statistics, quantiles).
    Value,
}

/// An unsigned key that radix selection digs through from its top bits down.
pub trait RadixKey: Copy + Ord + Send + Sync + std::fmt::Debug + 'static {
    const BITS: u32;
    const MIN: Self;
    const MAX: Self;
    fn to_u64(self) -> u64;
    fn from_u64(v: u64) -> Self;
}

macro_rules! radix_key {
    ($($t:ty),*) => {$(
        impl RadixKey for $t {
            const BITS: u32 = <$t>::BITS;
            const MIN: Self = <$t>::MIN;
            const MAX: Self = <$t>::MAX;
            #[inline(always)]
            fn to_u64(self) -> u64 { self as u64 }
            #[inline(always)]
            fn from_u64(v: u64) -> Self { v as $t }
        }
    )*};
}
radix_key!(u16, u32, u64);

/// A floating-point element type that can be ranked.
pub trait Score: Copy + Send + Sync + 'static {
    type Key: RadixKey;
    /// Name used in messages ("float32", ...).
    const NAME: &'static str;
    fn abs_key(self) -> Self::Key;
    fn value_key(self) -> Self::Key;
    fn is_nan(self) -> bool;
    fn to_f64(self) -> f64;
    /// The value whose `value_key` is `key`.
    fn from_value_key(key: Self::Key) -> Self;
    /// The non-negative value whose `abs_key` is `key`.
    fn from_abs_key(key: Self::Key) -> Self;

    #[inline(always)]
    fn key(self, order: Order) -> Self::Key {
        match order {
            Order::Abs => self.abs_key(),
            Order::Value => self.value_key(),
        }
    }
    #[inline(always)]
    fn from_key(key: Self::Key, order: Order) -> Self {
        match order {
            Order::Abs => Self::from_abs_key(key),
            Order::Value => Self::from_value_key(key),
        }
    }
}

/// A key function fixed at compile time, so hot loops carry no per-element `match` on the order.
pub trait KeyFn<T: Score>: Copy + Send + Sync {
    fn key(x: T) -> T::Key;
}

#[derive(Clone, Copy)]
pub struct AbsKey;
#[derive(Clone, Copy)]
pub struct ValueKey;

impl<T: Score> KeyFn<T> for AbsKey {
    #[inline(always)]
    fn key(x: T) -> T::Key {
        x.abs_key()
    }
}

impl<T: Score> KeyFn<T> for ValueKey {
    #[inline(always)]
    fn key(x: T) -> T::Key {
        x.value_key()
    }
}

/// Call a function generic over `KeyFn` with the key function that `order` names.
macro_rules! with_key_fn {
    ($order:expr, $f:ident :: <$T:ty> ( $($arg:expr),* $(,)? )) => {
        match $order {
            $crate::select::key::Order::Abs => $f::<$T, $crate::select::key::AbsKey>($($arg),*),
            $crate::select::key::Order::Value => $f::<$T, $crate::select::key::ValueKey>($($arg),*),
        }
    };
}
pub(crate) use with_key_fn;

macro_rules! float_score {
    ($t:ty, $k:ty, $name:literal, $to_bits:expr, $from_bits:expr, $to_f64:expr, $nan_abs:expr) => {
        impl Score for $t {
            type Key = $k;
            const NAME: &'static str = $name;
            #[inline(always)]
            fn abs_key(self) -> $k {
                let bits: $k = $to_bits(self);
                bits & !(1 << (<$k>::BITS - 1))
            }
            #[inline(always)]
            fn value_key(self) -> $k {
                let bits: $k = $to_bits(self);
                let sign: $k = 1 << (<$k>::BITS - 1);
                if bits & sign != 0 { !bits } else { bits | sign }
            }
            #[inline(always)]
            fn is_nan(self) -> bool {
                self.abs_key() > $nan_abs
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                $to_f64(self)
            }
            #[inline(always)]
            fn from_value_key(key: $k) -> Self {
                let sign: $k = 1 << (<$k>::BITS - 1);
                $from_bits(if key & sign != 0 { key & !sign } else { !key })
            }
            #[inline(always)]
            fn from_abs_key(key: $k) -> Self {
                $from_bits(key)
            }
        }
    };
}

// The last argument is the abs-key of +inf: any larger abs-key is a NaN.
float_score!(f32, u32, "float32", f32::to_bits, f32::from_bits, |x: f32| x as f64, 0x7F80_0000u32);
float_score!(f64, u64, "float64", f64::to_bits, f64::from_bits, |x: f64| x, 0x7FF0_0000_0000_0000u64);
float_score!(f16, u16, "float16", f16::to_bits, f16::from_bits, f16::to_f64, 0x7C00u16);
float_score!(bf16, u16, "bfloat16", bf16::to_bits, bf16::from_bits, bf16::to_f64, 0x7F80u16);

#[cfg(test)]
mod tests {
    use super::*;

    fn check_order<T: Score + PartialOrd + Copy>(values: &[T]) {
        for &a in values {
            for &b in values {
                let (ka, kb) = (a.value_key(), b.value_key());
                if a < b {
                    assert!(ka < kb);
                }
                if a.to_f64().abs() < b.to_f64().abs() {
                    assert!(a.abs_key() < b.abs_key());
                }
                if a.to_f64().abs() == b.to_f64().abs() {
                    assert_eq!(a.abs_key(), b.abs_key());
                }
            }
            assert_eq!(T::from_value_key(a.value_key()).to_f64().to_bits(), a.to_f64().to_bits());
        }
    }

    #[test]
    fn keys_preserve_order_f32() {
        check_order(&[f32::NEG_INFINITY, -3.5, -1.0, -f32::MIN_POSITIVE, -1e-45, -0.0, 0.0, 1e-45, 0.5, 2.0, f32::MAX, f32::INFINITY]);
    }

    #[test]
    fn keys_preserve_order_f64() {
        check_order(&[f64::NEG_INFINITY, -3.5, -1.0, -5e-324, -0.0, 0.0, 5e-324, 0.5, f64::MAX, f64::INFINITY]);
    }

    #[test]
    fn keys_preserve_order_half() {
        let vals = [-65504.0f32, -2.0, -1.0, -0.0, 0.0, 6e-8, 1.0, 3.0, 65504.0];
        check_order(&vals.map(f16::from_f32));
        check_order(&vals.map(bf16::from_f32));
        assert!(f16::NAN.is_nan() && !f16::INFINITY.is_nan());
        assert!(bf16::NAN.is_nan() && !bf16::INFINITY.is_nan());
    }

    #[test]
    fn nan_detected_through_keys() {
        assert!(f32::NAN.is_nan() && (-f32::NAN).is_nan() && !f32::INFINITY.is_nan());
        assert!(f64::NAN.is_nan() && !f64::NEG_INFINITY.is_nan());
    }
}
