"""Architecture search and once-for-all training: TAS, EEEA-Net and DepS."""
