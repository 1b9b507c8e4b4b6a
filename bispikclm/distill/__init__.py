"""SpAD distillation: teachers, losses and the trainer."""

from .losses import DEFAULT_WEIGHTS, TERMS, SpADLoss
from .teacher import TeacherOutput, check_teacher, load_teacher, teacher_forward
from .trainer import TEACHER_DTYPES, TrainConfig, Trainer, TrainingDiverged

__all__ = ["DEFAULT_WEIGHTS", "TEACHER_DTYPES", "TERMS", "SpADLoss", "TeacherOutput", "TrainConfig", "Trainer",
           "TrainingDiverged", "check_teacher", "load_teacher", "teacher_forward"]
