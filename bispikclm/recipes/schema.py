"""What a recipe may hold: its sections, and the keys of each with their types (the strings
:func:`bispikclm.validation.check_types` reads). ``bispikclm train`` and ``bispikclm quickstart`` check recipes
against these, and the bad-input tests break recipes with them. The student section's keys are
``BiSpikCLMConfig``'s fields and the train sections' are ``TrainConfig``'s (both checked by those classes), plus
:data:`STUDENT_KEYS` here.

This module imports nothing, so the command line reads it without loading torch.
"""

from __future__ import annotations

# ---- bispikclm train RECIPE -----------------------------------------------------------------------------------

SECTIONS = ("teacher", "tokenizer", "data", "student", "train", "teacher_cache")
REQUIRED_SECTIONS = ("teacher", "data", "train")
# teacher and tokenizer: a Hub name, a save_pretrained folder, a .gguf file or a short name (smollm2-135m)
MODEL_TYPES = {"teacher": "str", "tokenizer": "str | None"}
DATA_TYPES = {"train": "dict", "valid": "dict"}
# one data source (data.train, data.valid): a text file, a folder of split files or a dataset name
SOURCE_TYPES = {"source": "str", "split": "str", "name": "str | None", "text_field": "str",
                "max_documents": "int | None", "max_tokens": "int | None",
                "detokenize": "str | None", "separators": "bool"}
# student keys beside BiSpikCLMConfig's fields: kind (STUDENT_KINDS) and init (bispikclm.distill.init.INIT_MODES)
STUDENT_KEYS = ("kind", "init")
# student.kind: the spiking student, or the ANN of exactly its shape (bispikclm.ann), the baseline for the price of
# spikes: the same teacher, losses, tokens, data order and seed
STUDENT_KINDS = ("spiking", "ann")
# teacher_cache: {folder: DIR, top_k: K, batch_size: B}: run the teacher once over the training sequences and keep
# what the losses need (bispikclm.distill.teacher_cache); students sharing the folder share the teacher pass
CACHE_FIELDS = ("folder", "top_k", "batch_size")

# ---- bispikclm quickstart -------------------------------------------------------------------------------------

QUICKSTART_SECTIONS = ("tokenizer", "teacher", "teacher_train", "student", "train")
# the OPTConfig fields a quickstart teacher may set
TEACHER_FIELDS = {"hidden_size": "int", "num_hidden_layers": "int", "num_attention_heads": "int", "ffn_dim": "int",
                  "max_position_embeddings": "int", "dropout": "float", "attention_dropout": "float",
                  "activation_function": "str", "init_std": "float"}
# the quickstart's tokenizer section: a byte-level BPE trained on WikiText-2 train
TOKENIZER_TYPES = {"vocab_size": "int"}
