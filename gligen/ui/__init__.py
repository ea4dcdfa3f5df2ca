"""`gligen ui`: draw a layout in a browser, generate, verify, download (Gradio).

`canvas` turns layouts into the drawing canvas and back (no Gradio needed), `app` builds the
page, `cli` is the command. Gradio comes with the `ui` extra: `pip install "gligen[ui]"`.
"""
