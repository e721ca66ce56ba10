"""Stage 0: captions from LLaVA labels, and the exported CLIP checkpoint loads into the LVLM's tower."""

import lightning as L
import torch

from stgc.constants import IGNORE_INDEX
from stgc.model.vision import VisionTower
from stgc.vision_pretrain import CLIPPretrainModule


def test_captions_are_the_trained_label_ids_padded_to_the_context(easy_vqa_dir, tmp_path) -> None:
    module = CLIPPretrainModule(
        tokenizer=str(easy_vqa_dir / "tokenizer"), export_path=str(tmp_path / "clip.pt")
    )
    labels = torch.tensor([[IGNORE_INDEX, 11, 12, 2], [IGNORE_INDEX, IGNORE_INDEX, 13, 2]])
    captions = module.captions(labels)
    assert captions.shape == (2, module.context_length)
    assert captions[0, :3].tolist() == [11, 12, 2] and captions[1, :2].tolist() == [13, 2]
    assert (captions[0, 3:] == module.tokenizer.pad_token_id).all()


def test_exported_clip_checkpoint_is_what_the_vision_tower_loads(easy_vqa_dir, tmp_path) -> None:
    export = tmp_path / "clip.pt"
    module = CLIPPretrainModule(tokenizer=str(easy_vqa_dir / "tokenizer"), export_path=str(export))
    torch.nn.init.normal_(module.clip.visual.conv1.weight)  # differ from any fresh initialisation
    module.trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    module.on_train_end()
    tower = VisionTower("stgc-vit-tiny", pretrained=str(export))
    torch.testing.assert_close(tower.visual.conv1.weight, module.clip.visual.conv1.weight, atol=0, rtol=0)
    torch.testing.assert_close(
        tower.visual.transformer.resblocks[0].mlp.c_fc.weight,
        module.clip.visual.transformer.resblocks[0].mlp.c_fc.weight,
        atol=0,
        rtol=0,
    )


def test_captions_equal_a_row_by_row_reference_and_need_no_host_sync(easy_vqa_dir, tmp_path) -> None:
    from stgc.host_syncs import HostSyncCounter

    module = CLIPPretrainModule(
        tokenizer=str(easy_vqa_dir / "tokenizer"), export_path=str(tmp_path / "clip.pt")
    )
    generator = torch.Generator().manual_seed(0)
    length = module.context_length + 20  # some captions are longer than the text tower's context
    labels = torch.randint(3, 50, (8, length), generator=generator)
    labels[torch.rand(8, length, generator=generator) < 0.3] = IGNORE_INDEX
    with HostSyncCounter() as syncs:
        captions = module.captions(labels)
    assert syncs.total == 0
    for row, sample in zip(captions, labels, strict=True):
        ids = sample[sample != IGNORE_INDEX][: module.context_length]
        expected = torch.full((module.context_length,), module.tokenizer.pad_token_id)
        expected[: len(ids)] = ids
        assert torch.equal(row, expected)
