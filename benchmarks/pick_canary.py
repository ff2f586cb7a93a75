"""Print the name of the best trained canary among the given directories (highest mean dense
accuracy in its training_log.json, then lowest final answer loss); a summary goes to stderr.
Used by ``gpu_session.sh canary``, which trains several recipes side by side."""

import json
import os
import sys


def main(paths) -> str:
    logs = {}
    for path in paths:
        log_path = os.path.join(path, "training_log.json")
        if os.path.exists(log_path):
            with open(log_path) as fh:
                logs[path] = json.load(fh)
    for path, log in logs.items():
        print(f"{os.path.basename(path)}: accuracy {log['dense_accuracy']} answer loss "
              f"{log['final_answer_loss']} steps {log['steps']}", file=sys.stderr)
    if not logs:
        return ""

    def rank(path):
        accuracy = logs[path]["dense_accuracy"]
        mean = sum(accuracy.values()) / max(len(accuracy), 1)
        return (mean, -(logs[path]["final_answer_loss"] or float("inf")))

    return os.path.basename(max(logs, key=rank))


if __name__ == "__main__":
    print(main(sys.argv[1:]))
