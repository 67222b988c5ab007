"""Example images of the Gradio demo; README.md says where each comes from and under which licence."""
