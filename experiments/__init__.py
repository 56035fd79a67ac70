"""The LightningCLI configs of lit-methods, shipped with the package as lit_methods.experiments."""
