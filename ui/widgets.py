"""Gradio inputs that hand their value to the server's validation unchanged.

Gradio's own ``Slider``/``Number`` check the range they were built with and round to their
precision before our code sees the value. For this app that is wrong in three ways: the step
range depends on the sampler and the checkpoint (a client that never loaded the page still has
the first sampler's slider), the message ("Value 0 is less than minimum value 1") does not name
the input, and ``None`` — "use this sampler's registry default" through the API — crashes the
slider. These subclasses keep Gradio's front end (``is_template``) and leave every check to
:func:`ui.requests.make_request`, which reads every limit from the sampler registry and names
the input it refuses.
"""

from __future__ import annotations

import gradio as gr
import gradio.component_meta as _meta

# Gradio writes a .pyi stub beside the source of every component class it sees defined; these are
# templates of its own components and need none (nor a stray file in the source tree).
_write_stub, _meta.create_or_modify_pyi = _meta.create_or_modify_pyi, lambda *args, **kwargs: None


class Slider(gr.Slider):
    """A slider whose value (or ``None``) reaches the handler unchanged; limits are checked on the server."""

    is_template = True

    def preprocess(self, payload):
        return payload

    def postprocess(self, value):
        return None if value is None else value


class Number(gr.Number):
    """A number box whose value (or ``None``) reaches the handler unchanged; limits are checked on the server."""

    is_template = True

    def preprocess(self, payload):
        return payload


class Checkbox(gr.Checkbox):
    """A checkbox that keeps ``None`` ("this sampler's default") as ``None``."""

    is_template = True

    def preprocess(self, payload):
        return payload

    def postprocess(self, value):
        return None if value is None else bool(value)


class Radio(gr.Radio):
    """Radio buttons whose value reaches the handler unchanged (the registry checks the choice and names the parameter)."""

    is_template = True

    def preprocess(self, payload):
        return payload


_meta.create_or_modify_pyi = _write_stub
