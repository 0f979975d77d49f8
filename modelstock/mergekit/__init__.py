"""mergekit's configs for ``merge_method: model_stock``, read as mergekit reads them
(``config.py``) and run as this package's file merge (``run.py``), with the base's tokenizer
deciding the vocabulary's rows where the config asks for it (``vocabulary.py``)."""
from .config import TOKENIZER_FILES, ModelStockConfig, load, model_card
from .run import run_config

__all__ = ["TOKENIZER_FILES", "ModelStockConfig", "load", "model_card", "run_config"]
