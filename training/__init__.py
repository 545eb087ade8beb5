"""The systems code of a training run, around the method of srpo.py: the processes, FSDP2 and the parts loaded
(runtime), checkpoints and the log, their export to the formats other tools run, the real images of offline SRPO
(image_data), the evaluation and its reward hacking measures."""
