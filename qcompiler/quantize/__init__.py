"""Stage 2, quantization in PyTorch: the block-sequential calibration engine (`calibration`), the methods (`methods`:
none, RTN, GPTQ, SpQR, AffineQuant, AffineQuant+SpQR; one class per method), and the learned transforms AffineQuant
installs and the passes fold (`transforms`)."""
