"""What training, evaluation and reconstruction share: loading a trained network, running it, showing it.

* :mod:`.checkpoint`: resolve and load a checkpoint (weights-only, strict; no training imports).
* :mod:`.predict`: model inputs, Gaussians, renders, the non-learned baseline, PSNR/SSIM.
* :mod:`.visuals`: image grids, labelled sheets, PNGs.
"""
