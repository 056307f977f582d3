"""Pictures of what a checkpoint predicts, from train.py (after fit) and eval.py, per task."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from zootrain.build import build_datamodule, build_module
from zootrain.data.shapes import ShapesDataModule
from zootrain.evaluate import evaluate
from zootrain.plots import class_colours
from zootrain.predictions import denormalise, plot_predictions, sample_indices
from zootrain.run import train
from zootrain.runs import eval_pictures_dir
from zootrain.tasks import Sample, get_task

from .test_plots import assert_drawn
from .test_training import TINY, config

# One short epoch per task; the validation split holds exactly the images the grid shows.
RUNS = {
    # Nothing learns (frozen backbone, lr 0): both epochs score the same, the first is the best
    # (ties do not replace a checkpoint), and the test of the best checkpoint runs after fit.
    "classification": [
        "data.num_val=16",
        "logger=tensorboard",
        "linear_probe=true",
        "optim.lr=0",
        "scheduler=none",
        "trainer.max_epochs=2",
        "test_after_fit=true",
    ],
    "segmentation": ["head=fpn", "data.num_val=8"],
    "detection": [
        "head=fcos",
        "head.model.fpn_channels=64",
        "data.image_size=64",
        "data.num_val=8",
        "data.batch_size=8",
    ],
    "instance_segmentation": [
        "head=mask_rcnn",
        "head.model.fpn_channels=32",
        "head.model.rpn_post_nms_top_n_train=100",
        "head.model.box_batch_size_per_image=32",
        "data.image_size=64",
        "data.num_val=8",
        "data.batch_size=8",
    ],
}
# Panels of predictions.png: one per image, or image / truth / prediction, or truth / prediction.
PANELS = {"classification": 16, "segmentation": 8 * 3, "detection": 8 * 2}
PANELS["instance_segmentation"] = PANELS["detection"]


@pytest.fixture(scope="module", params=list(RUNS))
def trained(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, DictConfig, dict]:
    task = request.param
    cfg = config(
        tmp_path_factory.mktemp(task),
        *TINY,
        "data.num_train=16",
        "data.batch_size=16",
        "trainer.max_epochs=1",
        "export_backbone=false",
        *RUNS[task],
        "pictures=true",
    )
    return task, cfg, train(cfg)


def test_train_writes_the_pictures_of_the_best_checkpoint(
    trained: tuple[str, DictConfig, dict],
) -> None:
    task, cfg, result = trained
    run = Path(cfg.paths.output_dir)
    assert result.pictures == [
        str(run / "predictions.png"),
        str(run / get_task(task).per_class_file),
    ]
    assert_drawn(run / "predictions.png", PANELS[task])
    assert_drawn(run / get_task(task).per_class_file, panels=1)
    assert_drawn(run / "metrics.png", panels=3, size=(1600, 460))
    assert result.best_epoch == 1
    epochs = 2 if task == "classification" else 1
    # of the whole run, also after trainer.test restored the best checkpoint's callback state
    assert [epoch for epoch, _ in result.monitor_history] == list(range(epochs))


def test_eval_writes_them_beside_the_checkpoints_run(
    trained: tuple[str, DictConfig, dict], tmp_path: Path
) -> None:
    task, cfg, result = trained
    checkpoint = Path(result.best_model_path)
    eval_cfg = config(tmp_path, f"ckpt_path={checkpoint}", "trainer.accelerator=cpu", name="eval")
    written = evaluate(eval_cfg).pictures
    directory = Path(cfg.paths.output_dir) / "eval" / "best-val"
    assert eval_pictures_dir(checkpoint, "val") == directory
    assert written == [
        str(directory / "predictions.png"),
        str(directory / get_task(task).per_class_file),
    ]
    assert_drawn(directory / "predictions.png", PANELS[task])
    assert_drawn(directory / get_task(task).per_class_file, panels=1)


def test_eval_output_dir_and_split(trained: tuple[str, DictConfig, dict], tmp_path: Path) -> None:
    task, _, result = trained
    if task != "classification":
        pytest.skip("one task is enough for the options")
    eval_cfg = config(
        tmp_path,
        f"ckpt_path={result.best_model_path}",
        "trainer.accelerator=cpu",
        "split=test",
        f"output_dir={tmp_path / 'pictures'}",
        name="eval",
    )
    evaluate(eval_cfg)
    assert sorted(p.name for p in (tmp_path / "pictures").iterdir()) == [
        "confusion_matrix.png",
        "predictions.png",
    ]


def test_tensorboard_gets_the_pictures_too(trained: tuple[str, DictConfig, dict]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    task, cfg, _ = trained
    if task != "classification":
        pytest.skip("the classification run logs to TensorBoard")
    events = EventAccumulator(str(Path(cfg.paths.output_dir) / "tensorboard")).Reload()
    assert {"val/predictions", "val/confusion_matrix"} <= set(events.Tags()["images"])


def test_the_samples_are_fixed_whatever_the_run_seed() -> None:
    torch.manual_seed(1)
    first = sample_indices(500, 16)
    torch.manual_seed(2)
    assert sample_indices(500, 16) == first
    assert len(set(first)) == 16 and first == sorted(first) and max(first) < 500
    assert sample_indices(5, 16) == [0, 1, 2, 3, 4]  # a split smaller than the grid


def test_pictures_show_the_real_colours(tmp_path: Path) -> None:
    """The images as the data gives them (uint8) and as the model takes them (normalised with
    the data module's statistics) both show the drawn scene."""
    datamodule = build_datamodule(config(tmp_path, "data.image_size=32"))
    assert isinstance(datamodule, ShapesDataModule)
    dataset = datamodule.splits["val"]
    image, _ = dataset[3]
    expected = dataset.scene(3).image.permute(1, 2, 0).numpy() / 255
    assert abs(denormalise(image, datamodule.mean, datamodule.std) - expected).max() < 1e-6
    module = build_module(config(tmp_path, "data.image_size=32"), datamodule)
    normalised = module.normalize(image)
    assert normalised.dtype == torch.float32
    shown = denormalise(normalised, datamodule.mean, datamodule.std)  # (H, W, 3)
    assert abs(shown - expected).max() < 1e-5


def test_detections_below_the_threshold_are_not_drawn() -> None:
    boxes = torch.tensor([[2.0, 2, 20, 20], [4, 4, 30, 30], [1, 1, 9, 9]])
    sample = Sample(
        image=torch.zeros(3, 32, 32),
        target={"boxes": boxes[:1], "labels": torch.tensor([0])},
        output={
            "boxes": boxes,
            "labels": torch.tensor([0, 1, 1]),
            "scores": torch.tensor([0.9, 0.1, 0.5]),
        },
    )
    figure = plot_predictions(get_task("detection"), [sample], ["circle", "star"], None, None)
    truth, predicted = figure.axes
    assert [t.get_text() for t in truth.texts] == ["circle"]
    assert [t.get_text() for t in predicted.texts] == ["circle 0.90", "star 0.50"]
    assert len(predicted.patches) == 2


def test_instance_masks_are_painted_under_their_boxes() -> None:
    """Truth masks and predicted masks (probabilities, thresholded at 0.5) in their class's
    colour; a detection below the score threshold paints nothing."""
    truth = torch.zeros(1, 32, 32, dtype=torch.uint8)
    truth[0, 4:12, 4:12] = 1
    probabilities = torch.zeros(2, 1, 32, 32)
    probabilities[0, 0, 20:30, 20:30] = 0.9  # shown: score 0.8
    probabilities[0, 0, 0:2, 0:2] = 0.4  # below the mask threshold
    probabilities[1, 0, 0:10, 20:30] = 0.9  # not shown: score 0.1
    sample = Sample(
        image=torch.zeros(3, 32, 32),
        target={"boxes": torch.tensor([[4.0, 4, 12, 12]]), "labels": torch.tensor([0]),
                "masks": truth},
        output={"boxes": torch.tensor([[20.0, 20, 30, 30], [20, 0, 30, 10]]),
                "labels": torch.tensor([1, 0]), "scores": torch.tensor([0.8, 0.1]),
                "masks": probabilities},
    )  # fmt: skip
    task = get_task("instance_segmentation")
    figure = plot_predictions(task, [sample], ["circle", "star"], None, None)
    truth_axis, predicted_axis = figure.axes
    colours = class_colours(2)
    for axis, colour, inside in (
        (truth_axis, colours[0], (8, 8)),
        (predicted_axis, colours[1], (25, 25)),
    ):
        shown = axis.get_images()[0].get_array()  # (H, W, 3): black image, masks painted
        expected = task.mask_alpha * torch.tensor(colour)
        assert torch.allclose(torch.as_tensor(shown[inside]).float(), expected.float(), atol=1e-6)
        painted = (torch.as_tensor(shown).abs().sum(-1) > 0).sum()
        assert painted in (8 * 8, 10 * 10)  # only the shown mask, above its threshold
    assert [t.get_text() for t in predicted_axis.texts] == ["star 0.80"]


def test_per_class_ap_averages_to_torchmetrics_map() -> None:
    """AP and AP50 per class, read from the precision array, average to COCO's map / map_50."""
    detection = get_task("detection")
    metric = detection.per_class_metric(num_classes=3)
    boxes = torch.tensor([[0.0, 0, 20, 20], [20, 20, 30, 34], [5, 5, 25, 25]])
    targets = [{"boxes": boxes, "labels": torch.tensor([0, 1, 1])}]
    # IoUs 0.52 (a match at IoU 0.50 only), 0.73, 0.82
    shifted = boxes + torch.tensor([[4.0, 3, 4, 3], [2, 1, 2, 1], [2, 1, 2, 1]])
    scores = torch.tensor([0.9, 0.4, 0.8])
    predictions = [{"boxes": shifted, "labels": torch.tensor([0, 1, 1]), "scores": scores}]
    metric.update(predictions, targets)
    values = metric.compute()
    figure = detection.plot_per_class(values, ["circle", "star", "ring"], "title", "val")
    axis = figure.axes[0]
    ap, ap50 = ([p.get_width() for p in bars] for bars in axis.containers)
    assert len(ap) == len(ap50) == 2  # ring has no boxes: no bar
    assert "no boxes of this class" in [t.get_text() for t in axis.texts]
    assert sum(ap) / 2 == pytest.approx(float(values["map"]), abs=1e-6)
    assert sum(ap50) / 2 == pytest.approx(float(values["map_50"]), abs=1e-6)
    assert 0 < min(ap) < max(ap50) <= 1


def test_per_class_mask_ap_of_a_model_that_finds_nothing() -> None:
    """torchmetrics leaves out the per-class values of a mask mAP without a single detection;
    the figure then gives the classes with objects AP 0, as the box mAP does, not a KeyError."""
    task = get_task("instance_segmentation")
    metric = task.per_class_metric(num_classes=3)
    masks = torch.zeros(2, 16, 16, dtype=torch.uint8)
    masks[0, :8, :8] = masks[1, 8:, 8:] = 1
    target = {"boxes": torch.tensor([[0.0, 0, 8, 8], [8, 8, 16, 16]]), "masks": masks}
    target["labels"] = torch.tensor([0, 2])
    nothing = {
        "boxes": torch.zeros(0, 4),
        "masks": torch.zeros(0, 1, 16, 16),
        "labels": torch.zeros(0, dtype=torch.int64),
        "scores": torch.zeros(0),
    }
    metric.update([nothing], [target])
    values = metric.compute()
    assert "map_per_class" not in values  # what made the pictures fail
    figure = task.plot_per_class(values, ["circle", "star", "ring"], "title", "val")
    ap, ap50 = ([p.get_width() for p in bars] for bars in figure.axes[0].containers)
    assert ap == ap50 == [0.0, 0.0]  # circle and ring: objects, none found; star: no bar
