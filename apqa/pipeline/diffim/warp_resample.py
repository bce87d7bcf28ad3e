"""The warp's resampling core: separable Lanczos-3 (or bilinear) weights and the resampler
that gathers image, variance and mask of the template at arbitrary template positions.

Split from :mod:`apqa.pipeline.diffim.warp`, which holds the public API and the main flow.
"""

from __future__ import annotations

import numpy as np

from apqa.datamodel.exposure import Exposure
from apqa.datamodel.mask import Mask

#: Tap offsets relative to ``floor(position)`` of each kernel.
_TAP_OFFSETS: dict[str, tuple[int, ...]] = {
    "lanczos3": (-2, -1, 0, 1, 2, 3),
    "bilinear": (0, 1),
}
#: Fractional positions are rounded to 1/_PHASES pixel to look the kernel weights up in a table:
#: at most 6e-5 px off, far below the 0.01 px astrometric budget of image differencing.
_PHASES = 8192


def _axis_weights(frac: np.ndarray, kernel: str) -> np.ndarray:
    """Normalized 1-d kernel weights ``(n_taps, N)`` (float64) for fractional positions in
    [0, 1]; tap ``k`` sits at ``floor(position) + _TAP_OFFSETS[kernel][k]``.

    Examples
    --------
    >>> w = _axis_weights(np.array([0.0, 0.5]), "lanczos3")
    >>> w[:, 0].tolist(), round(float(w[2, 1]), 4), round(float(w.sum(0)[1]), 6)
    ([0.0, 0.0, 1.0, 0.0, 0.0, 0.0], 0.6114, 1.0)
    """
    frac = np.asarray(frac, np.float64)
    if kernel == "bilinear":
        return np.stack([1.0 - frac, frac])
    t = frac[None, :] - np.asarray(_TAP_OFFSETS["lanczos3"], np.float64)[:, None]
    weights = np.sinc(t) * np.sinc(t / 3.0)
    # sinc vanishes at non-zero integers only to rounding (~1e-17): make it exact so that a
    # template already on the grid is copied unchanged.
    weights[np.abs(weights) < 1e-12] = 0.0
    return weights / weights.sum(axis=0, keepdims=True)


def noise_transfer(kernel: str, frequencies: np.ndarray, n_phases: int = 64
                   ) -> tuple[np.ndarray, float]:
    """What resampling does to white noise, along one axis, averaged over sub-pixel phases.

    Returns the power transfer ``A(f)`` at ``frequencies`` (cycles per pixel; ``A(0) = 1``,
    since the weights sum to one) and the mean per-pixel variance factor ``sum(w^2)``. A
    warped template's noise power is ``var * A(fx) * A(fy)`` for white input noise ``var``: the
    warp hides variance from the per-pixel variance plane in correlations between pixels.

    Examples
    --------
    >>> a, factor = noise_transfer("lanczos3", np.array([0.0, 0.5]))
    >>> round(float(a[0]), 6), bool(a[1] < 0.5), 0.5 < factor < 1
    (1.0, True, True)
    """
    phases = (np.arange(n_phases) + 0.5) / n_phases
    weights = _axis_weights(phases, kernel)  # (taps, phases)
    taps = np.asarray(_TAP_OFFSETS[kernel], np.float64)
    response = np.einsum("tp,ft->fp", weights,
                         np.exp(-2j * np.pi * np.outer(frequencies, taps)))
    power = (np.abs(response) ** 2).mean(axis=1)
    return power, float((weights**2).sum(axis=0).mean())


class _Resampler:
    """The template's planes, padded and flattened for fast gathers, and the chunk resampler.

    The padding (as wide as the kernel) is NO_DATA, as are template pixels that are
    NO_DATA or have a non-finite image or variance (their values are zeroed so that they cannot
    leak NaN into neighbours through negligible weights).

    Image and variance are interleaved as the real and imaginary parts of one ``complex64``
    plane, and the kernel weights come from a table of ``w + 1j w^2`` at ``_PHASES`` fractional
    positions: one gather then fetches both values of a tap, and one multiply applies ``w`` to
    the image and ``w^2`` to the variance.
    """

    def __init__(self, template: Exposure, kernel: str, mask_threshold: float) -> None:
        template_mask = template.mask if template.mask is not None else Mask.zeros(template.shape)
        self.kernel = kernel
        self.offsets = _TAP_OFFSETS[kernel]
        self.n_taps = len(self.offsets)
        # Wide enough that positions clipped into range have no tap left on the template.
        self.pad = self.n_taps
        self.threshold = np.float32(mask_threshold)
        self.planes = Mask(np.zeros((1, 1)), template_mask.planes)
        self.no_data = np.int32(1 << self.planes.add_plane("NO_DATA"))
        height, width = template.shape
        self.width, self.height = width, height
        p = self.pad
        self.padded_width = width + 2 * p
        padded_shape = (height + 2 * p, width + 2 * p)
        pixels = np.zeros((*padded_shape, 2), np.float32)
        mask = np.full(padded_shape, self.no_data, np.int32)
        bad = (((template_mask.array & self.no_data) != 0) | ~np.isfinite(template.image)
               | ~np.isfinite(template.variance))
        pixels[p:p + height, p:p + width, 0] = np.where(bad, 0.0, template.image)
        pixels[p:p + height, p:p + width, 1] = np.where(bad, 0.0, template.variance)
        mask[p:p + height, p:p + width] = template_mask.array | np.where(bad, self.no_data, 0)
        self.pixels = pixels.reshape(-1).view(np.complex64)
        self.mask = mask.ravel()
        # Maps indexed by an output pixel's top-left tap. Where every pixel of the T x T
        # footprint has the same mask value (almost everywhere, also inside large masked areas),
        # that value is the output mask whatever the weights; only "mixed" footprints need the
        # per-tap OR, and only footprints touching NO_DATA can lose weight to it.
        differs = np.zeros(padded_shape, bool)
        differs[:, :-1] = mask[:, :-1] != mask[:, 1:]
        differs[:-1] |= mask[:-1] != mask[1:]
        self.mixed = self._footprint_any(differs).ravel()
        self.near_no_data = self._footprint_any((mask & self.no_data) != 0).ravel()
        weights = _axis_weights(np.arange(_PHASES + 1) / _PHASES, kernel)
        self.weights = np.ascontiguousarray(weights.astype(np.float32))  # (T, _PHASES + 1)
        self.weight_pairs = np.ascontiguousarray(
            (weights + 1j * weights * weights).astype(np.complex64))

    def _footprint_any(self, flags: np.ndarray) -> np.ndarray:
        """``out[y, x]``: any of ``flags`` in the T x T footprint whose top-left tap is (y, x)."""
        along_x = flags.copy()
        for i in range(1, self.n_taps):
            along_x[:, :-i] |= flags[:, i:]
        out = along_x.copy()
        for j in range(1, self.n_taps):
            out[:-j] |= along_x[j:]
        return out

    def _tap_views(self, plane: np.ndarray) -> list[np.ndarray]:
        """Flat views of ``plane`` starting at each tap's offset from the top-left tap."""
        wp = self.padded_width
        return [plane[j * wp + i:] for j in range(self.n_taps) for i in range(self.n_taps)]

    def resample(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                              np.ndarray]:
        """Image, variance (no Jacobian yet) and mask at template positions (u, v), flat."""
        n = u.size
        fu, fv = np.floor(u), np.floor(v)
        # Positions whose footprint would leave the padding have no tap on the template: they
        # are NO_DATA, and clipped to keep the gathers in range.
        lo = -self.pad - self.offsets[0]
        hi_x = self.width - 1 + self.pad - self.offsets[-1]
        hi_y = self.height - 1 + self.pad - self.offsets[-1]
        outside = (fu < lo) | (fu > hi_x) | (fv < lo) | (fv > hi_y)
        # Phase index into the weight table (rounded; u - fu is in [0, 1)).
        phase_x = ((u - fu) * _PHASES + 0.5).astype(np.intp)
        phase_y = ((v - fv) * _PHASES + 0.5).astype(np.intp)
        first = self.offsets[0] + self.pad
        base = (np.clip(fv, lo, hi_y).astype(np.intp) + first) * self.padded_width
        base += np.clip(fu, lo, hi_x).astype(np.intp) + first
        del fu, fv

        t = self.n_taps
        wx = [self.weight_pairs[i].take(phase_x, mode="clip").view(np.float32) for i in range(t)]
        total = np.zeros(2 * n, np.float32)
        row = np.empty(2 * n, np.float32)
        gathered = np.empty(n, np.complex64)
        flat = gathered.view(np.float32)
        weight_y = np.empty(n, np.complex64)
        views = self._tap_views(self.pixels)
        for j in range(t):
            # mode="clip" avoids the buffered bounds check of mode="raise"; indices are in
            # range by construction.
            np.take(views[j * t], base, out=gathered, mode="clip")
            np.multiply(flat, wx[0], out=row)
            for i in range(1, t):
                np.take(views[j * t + i], base, out=gathered, mode="clip")
                flat *= wx[i]
                row += flat
            np.take(self.weight_pairs[j], phase_y, out=weight_y, mode="clip")
            row *= weight_y.view(np.float32)
            total += row
        del wx, row, gathered

        image, variance = total[0::2], total[1::2]
        mask = self.mask.take(base, mode="clip")  # right wherever the footprint is uniform
        mask_views = self._tap_views(self.mask)
        todo = np.flatnonzero(self.mixed.take(base, mode="clip"))
        if todo.size:
            sub = base[todo]
            abs_x = [np.abs(self.weights[i].take(phase_x[todo], mode="clip")) for i in range(t)]
            bits = np.zeros(todo.size, np.int32)
            for j in range(t):
                # |wx wy| > threshold  <=>  |wx| > threshold / |wy|
                limit = self.threshold / np.maximum(
                    np.abs(self.weights[j].take(phase_y[todo], mode="clip")), np.float32(1e-30))
                for i in range(t):
                    value = mask_views[j * t + i].take(sub, mode="clip")
                    value *= abs_x[i] > limit
                    bits |= value
            mask[todo] = bits
        mask[outside] = self.no_data
        # Renormalize over the pixels actually used where negligible weights fell on NO_DATA
        # (zeroed) pixels, so that a flat template stays flat up to the edge of the coverage.
        edge = np.flatnonzero(self.near_no_data.take(base, mode="clip")
                              & ((mask & self.no_data) == 0))
        if edge.size:
            sub = base[edge]
            wxs = [self.weights[i].take(phase_x[edge], mode="clip") for i in range(t)]
            lost = np.zeros(edge.size, np.float32)
            for j in range(t):
                wy = self.weights[j].take(phase_y[edge], mode="clip")
                for i in range(t):
                    hit = (mask_views[j * t + i].take(sub, mode="clip") & self.no_data) != 0
                    lost += np.where(hit, wxs[i] * wy, np.float32(0.0))
            scale = 1.0 / (1.0 - lost)
            image[edge] *= scale
            variance[edge] *= scale * scale
        return image, variance, mask
