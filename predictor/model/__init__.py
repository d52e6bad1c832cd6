"""The trained predictor: features, the two stages, training, validation, prediction.

    from predictor.model import predict, load_model, train
    result = predict("config.json", task="math", memory="8GB")   # PredictionResult
    result.as_dict()                                              # the stable JSON contract
"""

from predictor.model.predict import (
    DEFAULT_TOLERANCE,
    TASKS,
    PredictionResult,
    PresetPrediction,
    Recommendation,
    predict,
)
from predictor.model.train import Predictor, load_model, train

__all__ = [
    "DEFAULT_TOLERANCE",
    "TASKS",
    "PredictionResult",
    "Predictor",
    "PresetPrediction",
    "Recommendation",
    "load_model",
    "predict",
    "train",
]
