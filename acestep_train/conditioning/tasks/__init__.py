"""Tasks as classes shared by the sampler and the training objective.

Each task (:class:`Text2Music`, :class:`Cover`, :class:`Repaint`) owns how its DiT context (source latents and
chunk mask), its instruction, its timbre input and its start point / per-step hooks are built from its inputs. The
official and DiffSynth rules are a :class:`Semantics` strategy the tasks and the planner ask, not branches.

Training: ``Text2Music().context(silence_latent, batch, frames)`` is the text2music DiT context ``[B, T, 2C]``.
"""

from acestep_train.conditioning.tasks.context import TaskItem, context_latents, silence_frames
from acestep_train.conditioning.tasks.cover import Cover
from acestep_train.conditioning.tasks.repaint import BlendRepaintItem, InjectRepaintItem, Repaint
from acestep_train.conditioning.tasks.semantics import DIFFSYNTH, OFFICIAL, SEMANTICS, Semantics, semantics_named
from acestep_train.conditioning.tasks.task import Encoders, Task, fit_frames
from acestep_train.conditioning.tasks.text2music import Text2Music

TASKS: dict[str, type[Task]] = {t.name: t for t in (Text2Music, Cover, Repaint)}

__all__ = ["Task", "Text2Music", "Cover", "Repaint", "TASKS", "TaskItem", "InjectRepaintItem", "BlendRepaintItem",
           "Encoders", "Semantics", "OFFICIAL", "DIFFSYNTH", "SEMANTICS", "semantics_named", "silence_frames",
           "context_latents", "fit_frames"]
