"""The language-model runtime: model references and loading (``models``), prompts as token ids (``chat``),
sampling (``generation``, its fast decode loop ``decoding``), LoRA fine-tuning (``training``), the teacher/student
distillation objective (``teacher``, ``teacher_schedule``, ``packed``, ``token_loss``) and the layer convention for
reading activations (``activations``).

May import: shared.core
"""
