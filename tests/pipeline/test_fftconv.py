"""Kernel spectra and 'same' convolutions against the plain transforms they shortcut."""

import numpy as np
import pytest
import scipy.fft as sfft

from apqa.pipeline.fftconv import DFT_PRODUCT_MAX_SIZE, centred_kernel_spectrum, convolve_same


def _wrapped(kernel: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The kernel on the grid with its centre at pixel (0, 0), wrapped around."""
    grid = np.zeros(shape, np.float64)
    half = kernel.shape[0] // 2
    for dy in range(-half, half + 1):
        for dx in range(-half, half + 1):
            grid[dy % shape[0], dx % shape[1]] = kernel[dy + half, dx + half]
    return grid


@pytest.mark.parametrize("size", [1, 3, 21, DFT_PRODUCT_MAX_SIZE - 1, DFT_PRODUCT_MAX_SIZE + 1,
                                  65])
@pytest.mark.parametrize("shape", [(96, 80), (135, 128)])
def test_kernel_spectrum_is_the_rfft2_of_the_wrapped_kernel(size, shape):
    # Both ways along y (the DFT product for small kernels, the FFT for large ones), on even
    # and odd grids.
    kernel = np.random.default_rng(size).normal(size=(size, size))
    expected = sfft.rfft2(_wrapped(kernel, shape))
    got = centred_kernel_spectrum(kernel, shape)
    assert got.shape == expected.shape and got.dtype == np.complex64
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6 * scale * size)


def test_kernel_larger_than_the_grid_is_an_error():
    with pytest.raises(ValueError, match="does not fit the FFT grid"):
        centred_kernel_spectrum(np.ones((9, 9)), (8, 64))


def test_convolve_same_matches_a_direct_convolution():
    rng = np.random.default_rng(5)
    image = rng.normal(size=(40, 52)).astype(np.float32)
    kernel = rng.normal(size=(5, 5))
    padded = np.pad(image.astype(np.float64), 2)
    direct = np.zeros(image.shape)
    for dy in range(5):
        for dx in range(5):
            # convolution: the kernel flipped against the image
            direct += kernel[4 - dy, 4 - dx] * padded[dy:dy + 40, dx:dx + 52]
    np.testing.assert_allclose(convolve_same(image, [kernel])[0], direct, atol=1e-4)
