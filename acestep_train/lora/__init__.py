"""Adapters on the DiT, with PEFT as the one runtime.

    >>> from acestep_train.lora import apply_lora, export_lora, load_adapters
    >>> apply_lora(model.decoder, rank=64, alpha=128, target_modules=cfg.model.lora_targets.attention)
    >>> export_lora(model.decoder, "out/adapter", "peft")                       # official ACE-Step / PEFT folder
    >>> export_lora(model.decoder, "out/adapter_comfyui.safetensors", "comfyui")
    >>> handle = load_adapters(decoder, [("a.safetensors", 1.0), ("b_folder", 0.5)], fuse=False)
    >>> handle.set_strength(1, 0.25); handle.remove()

One job per module:

* :mod:`.keys`: the tensor names of every layout we read, mapped to one normalised form ``{path: LoraDelta(A, B,
  scale)}``;
* :mod:`.files`: detect, read and write the four file layouts (``acestep``, ``peft``, ``diffsynth``, ``comfyui``);
  :func:`convert_lora` / :func:`save_lora_weights` rewrite an adapter in another layout;
* :mod:`.inject`: put a (trainable) PEFT adapter into the DiT (LoRA, DoRA, rsLoRA; LoKr through the Python API,
  ``apply_lora(kind="lokr")``), and read it out;
* :mod:`.apply`: files onto a model: as frozen PEFT adapters with strengths (inference), fused into the base
  weights (inference, differential LoRA training), into a trainable adapter (``mode.init_lora``), or exactly as saved
  for any kind (:func:`restore_adapter`, the way to run DoRA / LoKr exports);
* :mod:`.live`: strength, merge / unmerge and removal of adapters already in the DiT.
"""

from acestep_train.lora.apply import (LoadedAdapter, LoadedAdapters, load_adapter_into_trainable, load_adapters,
                                      load_adapters_fused_into_base, match_adapter, restore_adapter)
from acestep_train.lora.files import (FORMATS, PEFT_CONFIG, PEFT_WEIGHTS, PEFT_WEIGHTS_BIN, LoraFile, convert_lora,
                                      detect_format, export_lora, load_lora, read_adapter_state, read_lora,
                                      save_lora_weights, write_adapter)
from acestep_train.lora.inject import (LoraSpec, TrainableReport, adapter_names, adapter_state_dict, apply_lora,
                                       get_spec, match_targets, require_peft, set_active_adapters, trainable_report)
from acestep_train.lora.keys import LoraDelta, LoraError, LoraMatchError
from acestep_train.lora.live import (delete_adapter, merge_adapters, remove_adapters, set_adapter_strength,
                                     unmerge_adapters)

__all__ = ["FORMATS", "PEFT_CONFIG", "PEFT_WEIGHTS", "PEFT_WEIGHTS_BIN", "LoadedAdapter", "LoadedAdapters",
           "LoraDelta", "LoraError", "LoraFile", "LoraMatchError", "LoraSpec", "TrainableReport", "adapter_names",
           "adapter_state_dict", "apply_lora", "convert_lora", "delete_adapter", "detect_format", "export_lora",
           "get_spec", "load_adapter_into_trainable", "load_adapters", "load_adapters_fused_into_base", "load_lora",
           "match_adapter", "match_targets", "merge_adapters", "read_adapter_state", "read_lora", "remove_adapters",
           "require_peft", "restore_adapter", "save_lora_weights", "set_active_adapters", "set_adapter_strength",
           "trainable_report", "unmerge_adapters", "write_adapter"]
