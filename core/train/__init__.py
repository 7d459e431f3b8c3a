"""Training: data loading, AR teacher forcing and DMD distillation."""
