"""What torchcvt says of the transformers copy of a QuickGELU model, in one place: the model card, `convert
--help` and the docs quote it. A module of constants only, so the command line reads it without importing
torch."""

# Measured with docs/finetune.md's two training commands without model.overrides.activation=gelu (QuickGELU):
# pipeline() and torchcvt.predictor on the 181 validation images; docs/checkpoints.md gives the details.
APPROXIMATION = (
    "its probabilities differ from torchcvt's (measured: by up to 0.0048 on the 181 validation images of "
    "docs/finetune.md's fine-tuned digits model trained with QuickGELU; a top-1 near a tie can flip). "
    "Exact copies: the same folder loaded by torchcvt, torchcvt's own format, ONNX and TorchScript "
    "(`torchcvt export`), or this export written with `--remote-code` and loaded with "
    "`trust_remote_code=True`.")
