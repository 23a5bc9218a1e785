"""Triton-compatible (KServe v2) serving: HTTP + gRPC front ends over served models.

``trtpipe serve`` builds a :class:`~trtpipe.server.repository.ModelRepository` of engine dirs
and runs an :class:`~trtpipe.server.app.InferenceServer`. Heavy modules are imported by their users.
"""
