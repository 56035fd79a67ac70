"""Callbacks of lit-methods: techniques that apply to any LightningModule."""
