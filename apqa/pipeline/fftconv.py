"""FFT convolutions with scipy.fft: image-sized 'same' convolutions that share the image's
transform between kernels, and kernel spectra (small 'full' convolutions are
:func:`apqa.datamodel.psf.convolve_full`, which the simulator uses too).

scipy.signal has the same operations but costs half a second to import.
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft


def convolve_same(image: np.ndarray, kernels: list[np.ndarray]) -> list[np.ndarray]:
    """Convolve ``image`` with each odd-sized kernel ('same' size, zero padding), in float32,
    sharing the image's FFT between the kernels.

    The kernels' spectra are taken centred on pixel (0, 0) (:func:`centred_kernel_spectrum`),
    so the grid needs only half a kernel of zero padding and no output shift.

    Examples
    --------
    >>> image = np.zeros((5, 6), np.float32); image[2, 3] = 1.0
    >>> kernel = np.arange(9.0).reshape(3, 3)
    >>> bool(np.allclose(convolve_same(image, [kernel])[0][1:4, 2:5], kernel, atol=1e-5))
    True
    """
    half = max(kernel.shape[0] for kernel in kernels) // 2
    fast = (sfft.next_fast_len(image.shape[0] + half, real=True),
            sfft.next_fast_len(image.shape[1] + half, real=True))
    fi = sfft.rfft2(image.astype(np.float32, copy=False), s=fast)
    outs = []
    for kernel in kernels:
        product = centred_kernel_spectrum(kernel, fast)
        product *= fi
        full = sfft.irfft2(product, s=fast, overwrite_x=True)
        outs.append(full[:image.shape[0], :image.shape[1]].astype(np.float32))
    return outs


#: Kernels up to this size are transformed along y by a matrix product with the few DFT
#: columns their rows need: on a 4320-pixel grid 0.02 s against the FFT's 0.07 s for AL's
#: 21-pixel kernels (the FFT wins from about 65 pixels on).
DFT_PRODUCT_MAX_SIZE = 40


def centred_kernel_spectrum(kernel: np.ndarray, shape: tuple[int, int],
                            workers: int | None = None) -> np.ndarray:
    """``rfft2`` over ``shape`` of an odd-sized ``kernel`` placed with its centre at pixel
    (0, 0) (wrapped), at about half the cost of the full transform or less: only the kernel's
    rows are non-zero, so they alone are transformed along x; along y, a small kernel's few
    rows are combined by a matrix product with their DFT columns
    (:data:`DFT_PRODUCT_MAX_SIZE`), a large one's by the complex FFT.

    Examples
    --------
    >>> k = np.zeros((3, 3)); k[1, 1] = 1.0
    >>> bool(np.allclose(centred_kernel_spectrum(k, (8, 8)), 1.0))
    True
    """
    size = kernel.shape[0]
    half = size // 2
    if size > shape[0] or size > shape[1]:
        raise ValueError(f"kernel of size {size} does not fit the FFT grid {shape}")
    rows = np.zeros((size, shape[1]), np.float32)
    rows[:, :half + 1] = kernel[:, half:]
    rows[:, shape[1] - half:] = kernel[:, :half]
    rows_hat = sfft.rfft(rows, axis=1, workers=workers)
    if size <= DFT_PRODUCT_MAX_SIZE:
        # Row j holds the kernel's row at y = j - half (wrapped); the phases are reduced
        # modulo the grid in integers, so they are exact before the cast to complex64.
        frequency = np.arange(shape[0])[:, None]
        offset = (np.arange(size) - half)[None, :]
        phases = (frequency * offset) % shape[0] * (-2 * np.pi / shape[0])
        dft = np.empty(phases.shape, np.complex64)
        dft.real, dft.imag = np.cos(phases), np.sin(phases)
        return dft @ rows_hat.astype(np.complex64, copy=False)
    out = np.zeros((shape[0], rows_hat.shape[1]), np.complex64)
    out[:half + 1] = rows_hat[half:]
    out[shape[0] - half:] = rows_hat[:half]
    return sfft.fft(out, axis=0, workers=workers, overwrite_x=True)
