"""Any transformers MoE vision-language model (AutoModelForImageTextToText + AutoProcessor) as a
LightningModule that the LLaVA-format DataModules feed and the STGC callback runs on."""

from stgc.vlm.module import TransformersVLMModule

__all__ = ["TransformersVLMModule"]
