"""The names clients send for each LoRA (server/client_names.py), as vLLM's lora_requests_info lists them: each
LoRA first, then its names, the most recent first, bounded; a name with a comma never listed (the routers split
the label on commas). Against a real server's /metrics: test_serving.py."""

from knots_serve.serving.server.client_names import ClientNames


def test_each_lora_is_listed_with_its_most_recent_names_bounded():
    names = ClientNames(per_lora=2, loras=2)
    names.sent("tasks:a+b@knots-ta", "tasks:b+a@knots-ta")
    names.sent("tasks:a+b@knots-ta", "ab")
    names.sent("tasks:a+b@knots-ta", "exp")
    names.sent("tasks:a+b@knots-ta", "tasks:a+b@knots-ta")  # its own name: nothing to add
    names.sent("tasks:a+b@knots-ta", "a,b")  # never listed
    assert names.expand({"tasks:a+b@knots-ta": 3, "beta": 1}) == {"tasks:a+b@knots-ta": 3, "exp": 3, "ab": 3, "beta": 1}
    names.sent("x", "y")
    names.sent("z", "w")  # three LoRAs: the least recently served forgotten
    assert names.expand({"tasks:a+b@knots-ta": 1, "x": 2, "z": 1}) == {
        "tasks:a+b@knots-ta": 1,
        "x": 2,
        "y": 2,
        "z": 1,
        "w": 1,
    }


def test_a_name_sent_for_two_loras_counts_the_requests_of_both():
    names = ClientNames()
    names.sent("tasks:a+b@knots-ta", "exp")
    names.sent("tasks:a+c@knots-ties", "exp")  # an experiment's two arms
    assert names.expand({"tasks:a+b@knots-ta": 1, "tasks:a+c@knots-ties": 2})["exp"] == 3
