"""Stage 2's frozen teacher, built where its weights come from (SPEC "Stage 2": the teacher is the best
model so far). Its pseudo labels: dualner.teacher, which knows no engine."""

from __future__ import annotations

from pathlib import Path

from dualner.backend import TeacherEngine
from dualner.checkpoint import load_model_state
from dualner.job import Job
from dualner.model import DualNERModel
from dualner.model_io import load_weights
from dualner.run_layout import RunLayout


def build_teacher(job: Job, student: DualNERModel, stage1_checkpoint: Path, entity_types: int) -> TeacherEngine:
    """The frozen teacher, restored from what the run keeps (nothing of its own is checkpointed): on a
    resume the run's best model so far (best.json as the job starts; a rewind: as it stood then, see
    dualner.run_folder), else the stage-1 model, whose weights the student holds. Call it before the
    student's engine is built: an engine may partition the student's weights."""
    teacher = DualNERModel.from_encoder_config(student.encoder.config, entity_types,
                                               attention_mode=job.cfg.model.attention)
    best = job.folder_plan.best
    if best:
        source = RunLayout(job.run_dir).checkpoints / best["path"]
        load_weights(teacher, load_model_state(source), source)
    else:
        source = stage1_checkpoint
        teacher.load_state_dict(student.state_dict())
    job.log.info("stage 2: student from %s, teacher from %s", stage1_checkpoint, source)
    return job.engine_setup.build_teacher(teacher, job.cfg.stage2.teacher_placement)
