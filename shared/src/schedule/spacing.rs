//! The numpy arithmetic diffusers uses to place inference timesteps and interpolate
//! noise levels, reproduced operation for operation so that timesteps come out
//! identical (they are integers the U-Net embeds; an off-by-one would change images).
//!
//! numpy rounds half to even, builds `linspace` as `i·step + start` with the last
//! element set to `stop`, and fills a float `arange` from its first two elements.

/// `numpy.linspace(start, stop, num)` (endpoint included), float64.
pub(crate) fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    let step = if num > 1 {
        (stop - start) / (num - 1) as f64
    } else {
        0.0
    };
    let mut values: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    if num > 1 {
        values[num - 1] = stop;
    }
    values
}

/// `numpy.arange(start, stop, step)` with a float step: numpy computes the second
/// element as `start + step` and every later one as `start + i·(second − start)`.
pub(crate) fn arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let delta = (start + step) - start;
    (0..len as usize)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `numpy.round`: half to even.
pub(crate) fn round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `numpy.interp(x, arange(len(fp)), fp)`: piecewise-linear interpolation over the
/// integer grid 0, 1, …, in float64 with numpy's formula `slope·(x − xⱼ) + fpⱼ`, held
/// at the end values outside the grid.
pub(crate) fn interp_on_integer_grid(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    let low = fp[j] as f64;
    if j as f64 == x {
        return low;
    }
    let slope = fp[j + 1] as f64 - low;
    slope * (x - j as f64) + low
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_numpy() {
        assert_eq!(linspace(0.0, 999.0, 4), vec![0.0, 333.0, 666.0, 999.0]);
        assert_eq!(linspace(0.0, 999.0, 1), vec![0.0]);
        // np.linspace(0, 999, 50)[1] == 20.387755102040817
        assert_eq!(linspace(0.0, 999.0, 50)[1], 20.387755102040817);
    }

    #[test]
    fn arange_matches_numpy() {
        assert_eq!(
            arange(1000.0, 0.0, -250.0),
            vec![1000.0, 750.0, 500.0, 250.0]
        );
        // np.arange(1000, 0, -1000/30): 30 elements, the second 966.6666666666666
        let a = arange(1000.0, 0.0, -1000.0 / 30.0);
        assert_eq!(a.len(), 30);
        assert_eq!(a[1], 966.6666666666666);
        assert_eq!(a[29], 33.333333333332234);
    }

    #[test]
    fn round_half_to_even() {
        assert_eq!(round(498.5), 498.0);
        assert_eq!(round(499.5), 500.0);
        assert_eq!(round(20.4), 20.0);
    }

    #[test]
    fn interp_holds_ends_and_interpolates() {
        let fp = [1.0f32, 3.0, 7.0];
        assert_eq!(interp_on_integer_grid(-1.0, &fp), 1.0);
        assert_eq!(interp_on_integer_grid(0.5, &fp), 2.0);
        assert_eq!(interp_on_integer_grid(1.0, &fp), 3.0);
        assert_eq!(interp_on_integer_grid(1.25, &fp), 4.0);
        assert_eq!(interp_on_integer_grid(2.0, &fp), 7.0);
        assert_eq!(interp_on_integer_grid(5.0, &fp), 7.0);
    }
}
