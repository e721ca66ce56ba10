"""Token ids and labels shared by the data pipeline and the model."""

IGNORE_INDEX = -100  # label value that the LM loss skips (PyTorch/transformers convention)
IMAGE_TOKEN_ID = -200  # input_ids value of an image-patch position (LLaVA's IMAGE_TOKEN_INDEX)
IMAGE_PLACEHOLDER = "<image>"  # where the image goes in a conversation's first human turn
MODALITIES = {"text": 0, "image": 1}  # a token's modality as the MoE layers record it
OTHER_QUESTION_TYPE = "other"  # the question type of an answer without one, or of a type not listed
