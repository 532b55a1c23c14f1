"""FFA-LoRA as a hetfed strategy plugin (the strategy is :mod:`hetfed_ffa_lora.ffa_lora`)."""
