"""DIA detection's region-by-region extraction against one full-image sep call."""

from __future__ import annotations

import numpy as np
import sep
from scipy.ndimage import binary_dilation

from apqa.pipeline.detect import DiaDetectionConfig, _extract, grow_footprints, size_pixel_stack
from apqa.pipeline.pixels import disk, grow_box, grow_disk


def _snr_map(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Noise plus Gaussian blobs (single, blended pairs, one near a masked column), a long
    streak, and a masked column."""
    rng = np.random.default_rng(seed)
    height, width = 600, 500
    snr = rng.normal(0, 1, (height, width)).astype(np.float32)
    yy, xx = np.mgrid[:height, :width]
    blobs = [(50, 60, 30, 2.0), (120, 300, 12, 1.5), (126, 306, 9, 1.5), (400, 100, 50, 3.0),
             (404, 108, 20, 2.0), (250, 451, 15, 1.8), (580, 490, 25, 2.0)]
    for y, x, peak, sigma in blobs:
        snr += np.float32(peak) * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma**2))
    snr[300:304, 20:480] += 12.0  # a streak, cut in two by the bad column
    excluded = np.zeros(snr.shape, bool)
    excluded[:, 447] = True  # a bad column through the blob at x=451
    return snr, excluded


def _full_image(snr: np.ndarray, excluded: np.ndarray, config: DiaDetectionConfig):
    size_pixel_stack(snr.size)
    sep.set_sub_object_limit(4096)
    return sep.extract(snr, config.threshold, mask=excluded, minarea=config.min_area,
                       filter_kernel=None, deblend_cont=0.005, clean=False,
                       segmentation_map=True)


def test_regional_extraction_equals_one_full_image_call() -> None:
    snr, excluded = _snr_map()
    config = DiaDetectionConfig()
    objects, segmap = _extract(snr, excluded, config)
    expected, expected_seg = _full_image(snr, excluded, config)
    assert len(objects) == len(expected) >= 8  # the blended pairs are deblended
    order = np.lexsort((objects["x"], objects["y"]))
    expected_order = np.lexsort((expected["x"], expected["y"]))
    for name in ("x", "y", "peak"):
        np.testing.assert_allclose(objects[name][order], expected[name][expected_order],
                                   rtol=1e-6, err_msg=name)
    # sep (like SExtractor) gives a deblended parent's outskirt pixels to its children by a
    # random draw from the C library's generator, so children's pixel counts and boxes depend
    # on how many draws came before; the pixels over threshold are the same.
    npix, expected_npix = objects["npix"][order], expected["npix"][expected_order]
    assert np.abs(npix - expected_npix).max() <= 2 and npix.sum() == expected_npix.sum()
    for name in ("xmin", "xmax", "ymin", "ymax"):
        assert np.abs(objects[name][order] - expected[name][expected_order]).max() <= 2, name
    assert np.array_equal(segmap > 0, expected_seg > 0)
    # Each object's footprint carries its own label, as in sep's segmentation map.
    labels = segmap[np.rint(objects["y"]).astype(int), np.rint(objects["x"]).astype(int)]
    assert len(set(labels[labels > 0].tolist())) == np.count_nonzero(labels > 0)


def test_huge_regions_are_kept_whole() -> None:
    snr, excluded = _snr_map()
    config = DiaDetectionConfig(max_deblend_pixels=1000)
    objects, _ = _extract(snr, excluded, config)
    streak = objects[(objects["ymin"] <= 301) & (objects["ymax"] >= 302)
                     & (objects["xmax"] - objects["xmin"] > 400)]
    assert len(streak) == 1 and streak["npix"][0] == 4 * 427  # cut by the bad column


def test_nothing_above_threshold_gives_an_empty_catalog() -> None:
    snr = np.zeros((64, 64), np.float32)
    objects, segmap = _extract(snr, np.zeros(snr.shape, bool), DiaDetectionConfig())
    assert len(objects) == 0 and "x" in objects.dtype.names and not segmap.any()


def test_disk_and_box_growth_match_scipy() -> None:
    rng = np.random.default_rng(1)
    mask = rng.random((200, 150)) < 0.003
    mask[0, 0] = mask[-1, 40] = True
    for radius in (1, 3, 6, 11):
        assert np.array_equal(grow_disk(mask, radius), binary_dilation(mask, disk(radius)))
    assert np.array_equal(grow_box(mask, 0, 3),
                          binary_dilation(mask, np.ones((3, 1), bool), iterations=3))
    labels = np.zeros(mask.shape, np.int32)
    labels[mask] = np.arange(1, mask.sum() + 1)
    assert np.array_equal(grow_footprints(labels, 4), binary_dilation(mask, disk(4)))
