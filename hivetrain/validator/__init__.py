"""The validator: checks what miners claim against what it can verify, scores them and sets weights."""
