"""Dataset distillation: one synthetic-set platform and the DCC, DataDAM, TESLA and FYI methods on it."""
