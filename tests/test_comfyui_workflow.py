"""ComfyUI workflows: the editor-format graph, PNG text chunks, and the converter's two workflow files."""

from __future__ import annotations

import json

import PIL.Image
import pytest

from flow_lune.convert import (
    ConversionError,
    comfyui_editor_graph,
    comfyui_pnginfo,
    comfyui_workflow,
    convert_to_single_file,
    editor_workflow_path,
    workflow_path,
)
from flow_lune.convert.workflow import NODE_SPECS

SETTINGS = {"shift": 2.5, "cfg": 4.0, "steps": 8, "width": 512, "height": 384}


def check_editor_graph(api: dict, editor: dict) -> None:
    """The editor graph is the API graph: same nodes and widget values, and every link consistent both ways."""
    assert editor["version"] == 0.4 and editor["groups"] == [] and editor["config"] == {} and editor["extra"] == {}
    nodes = {node["id"]: node for node in editor["nodes"]}
    assert sorted(nodes) == sorted(int(nid) for nid in api) and editor["last_node_id"] == max(nodes)
    assert sorted(node["order"] for node in nodes.values()) == list(range(len(nodes)))
    link_ids = [link[0] for link in editor["links"]]
    assert link_ids == list(range(1, len(link_ids) + 1)) and editor["last_link_id"] == len(link_ids)
    api_links = {
        (int(nid), name, int(v[0]), v[1])
        for nid, n in api.items()
        for name, v in n["inputs"].items()
        if isinstance(v, list)
    }
    assert len(api_links) == len(editor["links"])
    for link_id, source, slot, target, input_slot, kind in editor["links"]:
        target_input = nodes[target]["inputs"][input_slot]
        source_output = nodes[source]["outputs"][slot]
        assert target_input["link"] == link_id and link_id in source_output["links"]
        assert target_input["type"] == source_output["type"] == kind
        assert (target, target_input["name"], source, slot) in api_links
        # A node runs after everything it reads from.
        assert nodes[source]["order"] < nodes[target]["order"]
    for nid, api_node in api.items():
        node = nodes[int(nid)]
        spec = NODE_SPECS[api_node["class_type"]]
        assert node["type"] == api_node["class_type"] and node["mode"] == 0
        assert all(inp["link"] is not None for inp in node["inputs"])  # every input slot is connected
        widgets = dict(zip(spec["widgets"], node["widgets_values"], strict=True))
        for name, value in widgets.items():
            if name == "control_after_generate":
                assert value == "fixed"  # the seed stays what the image was made with
            else:
                assert api_node["inputs"][name] == value
        # Every API input is either a link or a widget.
        linked = {name for name, _ in spec["inputs"]}
        assert set(api_node["inputs"]) == linked | (set(spec["widgets"]) - {"control_after_generate"})
        # Output links listed on a node are exactly the links leaving it.
        for slot, output in enumerate(node["outputs"]):
            assert output["slot_index"] == slot
            assert sorted(output["links"]) == sorted(
                link[0] for link in editor["links"] if link[1] == node["id"] and link[2] == slot
            )


@pytest.mark.parametrize(
    "kwargs",
    [SETTINGS, {**SETTINGS, "unet_only": True}, {**SETTINGS, "shift": None}],
    ids=["flow", "flow-unet-only", "epsilon"],
)
def test_editor_graph_is_the_api_graph(kwargs):
    api = comfyui_workflow("m.safetensors", prompt="a red cube", negative_prompt="blurry", seed=7, **kwargs)
    editor = comfyui_editor_graph(api)
    check_editor_graph(api, editor)
    types = {node["type"] for node in editor["nodes"]}
    assert ("ModelSamplingSD3" in types) == (kwargs["shift"] is not None)
    sampler = next(node for node in editor["nodes"] if node["type"] == "KSampler")
    assert sampler["widgets_values"] == [7, "fixed", 8, 4.0, "euler", api["7"]["inputs"]["scheduler"], 1.0]
    texts = sorted(node["widgets_values"][0] for node in editor["nodes"] if node["type"] == "CLIPTextEncode")
    assert texts == ["a red cube", "blurry"]
    json.dumps(editor, allow_nan=False)  # plain JSON: no NaN, no objects


def test_editor_graph_refuses_unknown_nodes_and_cycles():
    api = comfyui_workflow("m.safetensors", **SETTINGS)
    with pytest.raises(ValueError, match="no editor layout for node types.*LoraLoader"):
        comfyui_editor_graph({**api, "10": {"class_type": "LoraLoader", "inputs": {}}})
    cyclic = json.loads(json.dumps(api))
    cyclic["3"]["inputs"]["model"] = ["7", 0]  # ModelSamplingSD3 reads the sampler that reads it
    with pytest.raises(ValueError, match="cycle"):
        comfyui_editor_graph(cyclic)


def test_png_chunks_round_trip_through_pillow(tmp_path):
    """The chunks ComfyUI reads on drop: 'workflow' (editor format) and 'prompt' (API format), as Pillow reads them."""
    info = comfyui_pnginfo(
        "flow_lune.safetensors", prompt="a lighthouse, ünïcödé", negative_prompt="", seed=123, **SETTINGS
    )
    path = tmp_path / "sample.png"
    PIL.Image.new("RGB", (8, 8), (200, 30, 30)).save(path, pnginfo=info)
    with PIL.Image.open(path) as image:
        image.load()
        chunks = dict(image.text)
        assert image.getpixel((0, 0)) == (200, 30, 30)
    api = json.loads(chunks["prompt"])
    editor = json.loads(chunks["workflow"])
    expected = comfyui_workflow(
        "flow_lune.safetensors", prompt="a lighthouse, ünïcödé", negative_prompt="", seed=123, **SETTINGS
    )
    assert api == expected and editor == comfyui_editor_graph(expected)
    check_editor_graph(api, editor)
    assert api["3"]["inputs"]["shift"] == 2.5 and api["6"]["inputs"]["width"] == 512
    assert api["4"]["inputs"]["text"] == "a lighthouse, ünïcödé"  # escaped in the chunk, exact after parsing


def test_converter_writes_both_workflow_formats(tiny_pipeline_dir, tmp_path):
    dst = tmp_path / "teacher.safetensors"
    result = convert_to_single_file(
        tiny_pipeline_dir, dst, prediction_type="epsilon", source_hash=False, progress=False
    )
    assert result.workflow == workflow_path(dst) == tmp_path / "teacher.workflow.json"
    assert result.editor_workflow == editor_workflow_path(dst) == tmp_path / "teacher.workflow-editor.json"
    api = json.loads(result.workflow.read_text())
    editor = json.loads(result.editor_workflow.read_text())
    check_editor_graph(api, editor)
    assert "workflow-editor.json" in result.summary()
    # An existing editor file is part of DST too: refused before any work, nothing changed.
    other = tmp_path / "other.safetensors"
    editor_workflow_path(other).write_text("mine")
    with pytest.raises(ConversionError, match=r"other\.workflow-editor\.json already exists.*--overwrite"):
        convert_to_single_file(tiny_pipeline_dir, other, prediction_type="epsilon", progress=False)
    assert editor_workflow_path(other).read_text() == "mine" and not other.exists()
    assert not workflow_path(other).exists()
