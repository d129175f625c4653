"""mnist-lowprec: a Flower / PyTorch app trained and communicated in 8-bit block floating point."""
