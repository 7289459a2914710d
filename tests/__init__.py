"""The test suite, a package so that its helpers import as `tests.helpers`, `tests.cuda_emu`, `tests.cuda_direct`."""
