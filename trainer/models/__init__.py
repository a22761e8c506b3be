"""The phase classifiers behind one interface (see :class:`trainer.models.base.Model`).

model = build_model("cnn", (30, 100), n_classes=5, profile="quick", seed=0)
model.fit(x_tr, y_tr, x_val, y_val, progress=print)
proba = model.predict_proba(x_test)            # float32 (N, n_classes)
model.save(run / "cnn-realistic", schema_hash=schema_hash())
model = load_model(run / "cnn-realistic", expected_schema_hash=schema_hash())
model.to_onnx(out / "cnn-realistic.onnx")      # input "features", output "probabilities"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from schema.vocab import MODELS
from trainer.models.base import FitResult, Model, ProgressFn, SchemaMismatch, read_checkpoint_doc


def _registry() -> dict[str, type[Model]]:
    # Imported lazily so `import trainer.models` does not pull torch and xgboost at once.
    from trainer.models.cnn import CNN
    from trainer.models.gbt import GBT
    from trainer.models.mlp import MLP
    from trainer.models.rnn import GRU, LSTM
    from trainer.models.rocket import Rocket
    from trainer.models.transformer import Transformer

    reg = {m.name: m for m in (GBT, MLP, CNN, GRU, LSTM, Transformer, Rocket)}
    assert tuple(reg) == MODELS, "model registry out of step with schema.vocab.MODELS"
    return reg


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    n_classes: int = 5,
    profile: str = "quick",
    seed: int = 0,
    **overrides: Any,
) -> Model:
    """A fresh, unfitted model. ``overrides`` replace entries of the profile's config."""
    reg = _registry()
    if name not in reg:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(reg)}")
    return reg[name](tuple(input_shape), n_classes=n_classes, profile=profile, seed=seed, **overrides)


def load_model(directory: Path | str, expected_schema_hash: str) -> Model:
    """Load a checkpoint written by ``Model.save``; refuse one from another schema hash."""
    directory = Path(directory)
    doc = read_checkpoint_doc(directory)
    found = doc.get("schema_hash")
    if found != expected_schema_hash:
        raise SchemaMismatch(directory, str(found), expected_schema_hash)
    legacy = _registry()[doc["model"]].legacy_config if doc.get("model") in _registry() else {}
    model = build_model(
        doc["model"],
        tuple(doc["input_shape"]),
        n_classes=doc["n_classes"],
        profile=doc["profile"],
        seed=doc["seed"],
        **{**legacy, **doc["config"]},
    )
    model._load_weights(directory)
    if doc.get("fit"):
        model.fit_result = FitResult(**doc["fit"])
    return model


__all__ = ["FitResult", "Model", "ProgressFn", "SchemaMismatch", "build_model", "load_model"]
