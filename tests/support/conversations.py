"""Multi-turn conversations built from the bundled easy-vqa files."""

import json


def multi_turn_easy_vqa(easy_vqa_dir, path, images: int):
    """The first `images` images of easy-vqa train, each image's questions as one conversation."""
    conversations = {}
    for record in json.loads((easy_vqa_dir / "instruct_train.json").read_text()):
        if record["image"] not in conversations:
            if len(conversations) == images:
                break
            conversations[record["image"]] = {
                "id": record["image"],
                "image": record["image"],
                "conversations": [],
            }
        turns = record["conversations"]
        if conversations[record["image"]]["conversations"]:  # the image placeholder in the first turn only
            turns = [turns[0] | {"value": turns[0]["value"].replace("<image>\n", "")}, turns[1]]
        conversations[record["image"]]["conversations"] += turns
    path.write_text(json.dumps(list(conversations.values())))
    return path
