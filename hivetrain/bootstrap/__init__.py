"""``python -m hivetrain.bootstrap``: the long-lived DHT peer plus the /initial_peers HTTP API.

``peer`` runs the hivemind DHT and publishes its addresses to Redis; ``app`` is the stateless
Flask app that gunicorn serves from Redis alone; ``__main__`` runs both and stops both.
Nothing here imports hivemind at package import, so gunicorn workers stay light.
"""
