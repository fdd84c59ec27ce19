"""A ComfyUI workflow that samples a Flow Lune file correctly, in both of ComfyUI's JSON formats, and as PNG chunks.

ComfyUI loads every SD1.5 file as an epsilon model; nothing in the file can change that. A flow
model samples right only through ``ModelSamplingSD3`` (discrete flow sigmas with the shift, CONST
model: denoised = x - sigma * v), which is what this graph puts between the loader and the sampler.
An epsilon file (a teacher) gets the same graph without that node: ComfyUI's own way to sample SD1.5.

ComfyUI has two JSON forms of a graph. The *API format* (``comfyui_workflow``) maps node ids to
``{"class_type", "inputs"}``, a link being ``[source_id, output_slot]``; it is what ComfyUI's
``/prompt`` endpoint takes and what its "Export (API)" writes. The *editor format*
(``comfyui_editor_graph``, schema version 0.4) is what the editor saves: nodes with positions, input
and output slots, ``widgets_values`` in the order of the node's widgets, and a separate list of links
``[link_id, source_id, output_slot, target_id, input_slot, type]``. ComfyUI opens a dropped ``.json``
in either form (a file whose every value has a ``class_type`` is read as API format), and a dropped
PNG through its ``workflow`` text chunk (editor format), else its ``prompt`` chunk (API format): the
two chunks ``SaveImage`` writes and ``comfyui_pnginfo`` builds.
"""

from __future__ import annotations

import json

from PIL.PngImagePlugin import PngInfo

DEFAULT_BASE_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"  # SD1.5's usual file name, for CLIP and VAE
DEFAULT_NEGATIVE = ""  # distilled with the empty prompt as the unconditional branch


def comfyui_workflow(
    ckpt_name: str,
    *,
    shift: float | None,
    cfg: float,
    steps: int,
    width: int = 512,
    height: int = 512,
    unet_only: bool = False,
    base_ckpt_name: str = DEFAULT_BASE_CHECKPOINT,
    prompt: str = "a photograph of a lighthouse on a cliff at sunset",
    negative_prompt: str = DEFAULT_NEGATIVE,
    seed: int = 0,
    filename_prefix: str = "flow_lune",
) -> dict:
    """API-format graph: loader -> ModelSamplingSD3(shift) -> KSampler(euler, simple, cfg) -> VAEDecode -> SaveImage.

    ``shift`` None: an epsilon model, loader -> KSampler(euler, normal, cfg) with no ModelSamplingSD3 (a plain
    SD1.5 graph, e.g. to sample the teacher beside its student with the same prompt and seed).
    A UNet-only file loads through ``UNETLoader``, with CLIP and VAE taken from ``base_ckpt_name``.
    """
    graph: dict[str, dict] = {}
    if unet_only:
        graph["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": ckpt_name, "weight_dtype": "default"}}
        graph["2"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": base_ckpt_name}}
        model, clip, vae = ["1", 0], ["2", 1], ["2", 2]
    else:
        graph["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}}
        model, clip, vae = ["1", 0], ["1", 1], ["1", 2]
    if shift is not None:
        graph["3"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": model, "shift": float(shift)}}
        model = ["3", 0]
    graph["4"] = {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": clip}}
    graph["5"] = {"class_type": "CLIPTextEncode", "inputs": {"text": negative_prompt, "clip": clip}}
    graph["6"] = {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}}
    graph["7"] = {
        "class_type": "KSampler",
        "inputs": {
            "model": model,
            "positive": ["4", 0],
            "negative": ["5", 0],
            "latent_image": ["6", 0],
            "seed": int(seed),
            "steps": int(steps),
            "cfg": float(cfg),
            "sampler_name": "euler",
            # flow: ModelSamplingSD3's own sigma table, evenly spaced in t; epsilon: ComfyUI's default for SD1.5
            "scheduler": "simple" if shift is not None else "normal",
            "denoise": 1.0,
        },
    }
    graph["8"] = {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": vae}}
    graph["9"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": filename_prefix}}
    return graph


# The node types the graph uses: linked inputs (name, type), widgets in ComfyUI's order, outputs (name, type).
# KSampler's "control_after_generate" is a widget of the editor only (not an API input); "fixed" keeps the seed.
NODE_SPECS: dict[str, dict] = {
    "CheckpointLoaderSimple": {
        "inputs": [],
        "widgets": ["ckpt_name"],
        "outputs": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
    },
    "UNETLoader": {"inputs": [], "widgets": ["unet_name", "weight_dtype"], "outputs": [("MODEL", "MODEL")]},
    "ModelSamplingSD3": {"inputs": [("model", "MODEL")], "widgets": ["shift"], "outputs": [("MODEL", "MODEL")]},
    "CLIPTextEncode": {
        "inputs": [("clip", "CLIP")],
        "widgets": ["text"],
        "outputs": [("CONDITIONING", "CONDITIONING")],
    },
    "EmptyLatentImage": {"inputs": [], "widgets": ["width", "height", "batch_size"], "outputs": [("LATENT", "LATENT")]},
    "KSampler": {
        "inputs": [
            ("model", "MODEL"),
            ("positive", "CONDITIONING"),
            ("negative", "CONDITIONING"),
            ("latent_image", "LATENT"),
        ],
        "widgets": ["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
        "outputs": [("LATENT", "LATENT")],
    },
    "VAEDecode": {"inputs": [("samples", "LATENT"), ("vae", "VAE")], "widgets": [], "outputs": [("IMAGE", "IMAGE")]},
    "SaveImage": {"inputs": [("images", "IMAGE")], "widgets": ["filename_prefix"], "outputs": []},
}
EDITOR_WIDGET_DEFAULTS = {"control_after_generate": "fixed"}  # editor-only widgets and their values
EDITOR_SCHEMA_VERSION = 0.4  # nodes + links-as-arrays, what ComfyUI's editor still reads and writes
COLUMN_WIDTH, ROW_HEIGHT, NODE_SIZE = 360, 220, [315, 130]  # a readable layout; ComfyUI lets the user move nodes


def comfyui_editor_graph(api_graph: dict) -> dict:
    """The editor-format (schema 0.4) graph of an API-format ``api_graph`` made of the node types in ``NODE_SPECS``.

    Node ids stay the API ids (as integers); every API link ``[source_id, slot]`` becomes one editor link
    ``[link_id, source_id, slot, target_id, input_slot, type]``, listed in the target's input and the source's
    output; nodes are laid out in columns by their distance from the loaders, ``order`` is a topological order.
    """
    unknown = sorted({node["class_type"] for node in api_graph.values()} - NODE_SPECS.keys())
    if unknown:
        raise ValueError(f"no editor layout for node types {unknown}; known: {sorted(NODE_SPECS)}")
    depth = {nid: _depth(api_graph, nid) for nid in api_graph}
    order = sorted(api_graph, key=lambda nid: (depth[nid], int(nid)))
    nodes: dict[str, dict] = {}
    rows: dict[int, int] = {}
    for rank, nid in enumerate(order):
        api = api_graph[nid]
        spec = NODE_SPECS[api["class_type"]]
        row = rows.get(depth[nid], 0)
        rows[depth[nid]] = row + 1
        widgets = [
            EDITOR_WIDGET_DEFAULTS[w] if w in EDITOR_WIDGET_DEFAULTS else api["inputs"][w] for w in spec["widgets"]
        ]
        node = {
            "id": int(nid),
            "type": api["class_type"],
            "pos": [depth[nid] * COLUMN_WIDTH, row * ROW_HEIGHT],
            "size": list(NODE_SIZE),
            "flags": {},
            "order": rank,
            "mode": 0,  # 0 = always run
            "inputs": [{"name": name, "type": kind, "link": None} for name, kind in spec["inputs"]],
            "outputs": [
                {"name": name, "type": kind, "links": [], "slot_index": slot}
                for slot, (name, kind) in enumerate(spec["outputs"])
            ],
            "properties": {"Node name for S&R": api["class_type"]},
            "widgets_values": widgets,
        }
        nodes[nid] = node
    links = []
    for nid in sorted(api_graph, key=int):
        spec = NODE_SPECS[api_graph[nid]["class_type"]]
        for input_slot, (name, kind) in enumerate(spec["inputs"]):
            source, slot = api_graph[nid]["inputs"][name]
            link_id = len(links) + 1
            links.append([link_id, int(source), int(slot), int(nid), input_slot, kind])
            nodes[nid]["inputs"][input_slot]["link"] = link_id
            nodes[str(source)]["outputs"][slot]["links"].append(link_id)
    return {
        "last_node_id": max(int(nid) for nid in api_graph),
        "last_link_id": len(links),
        "nodes": [nodes[nid] for nid in sorted(nodes, key=int)],
        "links": links,
        "groups": [],
        "config": {},
        "extra": {},
        "version": EDITOR_SCHEMA_VERSION,
    }


def _depth(api_graph: dict, nid: str, seen: frozenset = frozenset()) -> int:
    """Longest chain of links from a node without linked inputs to ``nid`` (0 for a loader)."""
    if nid in seen:
        raise ValueError(f"the graph has a cycle through node {nid}")
    sources = [value[0] for value in api_graph[nid]["inputs"].values() if isinstance(value, list)]
    return 1 + max((_depth(api_graph, str(s), seen | {nid}) for s in sources), default=-1)


def comfyui_pnginfo(
    ckpt_name: str,
    *,
    prompt: str,
    negative_prompt: str = DEFAULT_NEGATIVE,
    seed: int,
    steps: int,
    cfg: float,
    shift: float | None,
    width: int,
    height: int,
    unet_only: bool = False,
) -> PngInfo:
    """PNG text chunks that make ComfyUI rebuild, on drop, the graph that samples ``ckpt_name`` with these settings.

    ``prompt``: the API-format graph (``comfyui_workflow``); ``workflow``: the same graph in editor format
    (``comfyui_editor_graph``), which ComfyUI prefers. Use as ``image.save(path, pnginfo=comfyui_pnginfo(...))``.
    ``shift`` None: an epsilon model (no ModelSamplingSD3). The seed is ComfyUI's: the same seed gives ComfyUI's
    noise, not the noise of a diffusers generator with that seed.
    """
    api = comfyui_workflow(
        ckpt_name,
        shift=shift,
        cfg=cfg,
        steps=steps,
        width=width,
        height=height,
        unet_only=unet_only,
        prompt=prompt,
        negative_prompt=negative_prompt,
        seed=seed,
    )
    info = PngInfo()
    info.add_text("prompt", json.dumps(api))
    info.add_text("workflow", json.dumps(comfyui_editor_graph(api)))
    return info
