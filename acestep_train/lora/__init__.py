"""PEFT adapters for the DiT: injection for training (:mod:`.inject`) and adapter files in and out (:mod:`.formats`).

    >>> from acestep_train.lora import apply_lora, export_lora, load_adapters
    >>> apply_lora(model.decoder, rank=64, alpha=128, target_modules=cfg.model.lora_targets.attention)
    >>> export_lora(model.decoder, "out/adapter", "peft")                       # official ACE-Step / PEFT folder
    >>> export_lora(model.decoder, "out/adapter_comfyui.safetensors", "comfyui")
    >>> handle = load_adapters(decoder, [("a.safetensors", 1.0), ("b_folder", 0.5)], fuse=False)
"""

from acestep_train.lora.formats import (FORMATS, LoadedAdapters, LoraDelta, LoraFile, LoraMatchError, convert_lora, detect_format,
                      export_lora, load_adapter_into_trainable, load_adapters, load_adapters_fused_into_base,
                      load_lora, match_adapter, read_adapter_state, read_lora, restore_adapter, save_lora_weights,
                      write_adapter)
from acestep_train.lora.inject import (LoraError, LoraSpec, TrainableReport, adapter_names, adapter_state_dict, apply_lora, get_spec,
                     match_targets, merge_adapters, remove_adapters, require_peft, set_active_adapters,
                     set_adapter_strength, trainable_report, unmerge_adapters)

__all__ = ["FORMATS", "LoadedAdapters", "LoraDelta", "LoraError", "LoraFile", "LoraMatchError", "LoraSpec",
           "TrainableReport", "adapter_names", "adapter_state_dict", "apply_lora", "convert_lora", "detect_format",
           "export_lora", "get_spec", "load_adapter_into_trainable", "load_adapters",
           "load_adapters_fused_into_base", "load_lora", "match_adapter", "match_targets",
           "merge_adapters", "read_adapter_state", "read_lora", "remove_adapters", "require_peft",
           "restore_adapter", "save_lora_weights", "set_active_adapters", "set_adapter_strength",
           "trainable_report", "unmerge_adapters", "write_adapter"]
