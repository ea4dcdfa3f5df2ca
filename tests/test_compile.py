"""The compiled fast path: `pipe.compile()` traces the UNet with its fusers once per grounding state.

The grounding scale lives in the fusers' scale buffers (graph inputs, not constants), so a schedule
whose scale changes every step compiles two graphs: with grounding and without (scale 0). The
backend here records the graphs dynamo hands it and runs them as traced; inductor's code generation
is left out to keep the test in seconds (`benchmarks/generate.py` measures it).
"""

import torch

from gligen.layout import Entity, Layout
from gligen.pipeline import GligenPipeline
from tests.tiny import save_tiny_gligen


def test_compiled_equals_eager_with_at_most_two_graphs(tmp_path):
    pipe = GligenPipeline.from_pretrained(str(save_tiny_gligen(tmp_path)[1]))
    layout = Layout("a cat", (Entity("a cat", (0.1, 0.2, 0.5, 0.9)),), width=16, height=16, seed=1)
    schedule = (0.3, 0.4, 0.3)  # 10 steps: 3 at scale 1, 4 decaying, 3 at 0

    def run():
        return pipe(layout, num_inference_steps=10, schedule=schedule, output_type="latent").images[0]

    eager = run()
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    pipe.compile(backend=recording_backend)
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    compiled = run()
    assert len(graphs) == 2
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-4)  # fused QKV and NHWC round differently
    run()
    assert len(graphs) == 2  # a second call compiles nothing
