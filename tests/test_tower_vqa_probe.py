"""benchmarks/tower_vqa_probe.py answers the world's VQA questions from per-cell scene probabilities: from
the true scenes it must score 100 on every type, and a wrong attribute must cost exactly its types."""

import json
import random

import numpy as np
import pytest

from benchmarks.tower_vqa_probe import Answerer, answer_all, one_hot, scene_labels, world
from llava_integration.evaluate import vqa_items
from llm2clip.data.qa import llava_instruct_samples
from llm2clip.data.world import sample_scene


@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    rng = random.Random(0)
    scenes, samples = [], []
    for i in range(400):
        scene = sample_scene(rng)
        scenes.append(scene.to_dict())
        samples += llava_instruct_samples(f"{i:04d}", f"images/{i:04d}.png", scene, "a long caption", rng)
    path = tmp_path_factory.mktemp("qa") / "test_instruct.json"
    path.write_text(json.dumps(samples))
    return scenes, vqa_items(path)


def test_true_scenes_answer_every_question(conversations):
    scenes, items = conversations
    w = world()
    probs = one_hot([scene_labels(s, w) for s in scenes], w)
    scores = answer_all(items, probs, {f"{i:04d}": i for i in range(len(scenes))}, w)
    assert {t for t in scores} == {"overall", "color", "count", "position", "existence"}
    assert all(v == 100 for v in scores.values()), scores


def test_a_wrong_colour_costs_the_colour_questions_only(conversations):
    scenes, items = conversations
    w = world()
    probs = one_hot([scene_labels(s, w) for s in scenes], w)
    colors = probs["color"]  # [N, 9, 1 + colours]: move every object's colour to the next one
    probs["color"] = np.concatenate([colors[..., :1], np.roll(colors[..., 1:], 1, axis=-1)], axis=-1)
    scores = answer_all(items, probs, {f"{i:04d}": i for i in range(len(scenes))}, w)
    assert scores["color"] == 0  # the answer is the colour
    assert scores["position"] < 5  # the answer names the neighbour's colour (and the reference is lost)
    assert scores["count"] == 100
    assert 0 < scores["existence"] < 100  # "yes" turns to "no"; most absent pairs stay absent


def test_an_unknown_question_is_refused():
    w = world()
    probs = {a: np.full((9, len(c)), 1 / len(c)) for a, c in w.classes.items()}
    with pytest.raises(ValueError, match="question templates"):
        Answerer(w)(probs, "What shape is the red object?")
