"""Parameter-efficient fine-tuning methods: one module per method (lora, lora_pro, bone, loldu)."""
