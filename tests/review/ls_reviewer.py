"""A reviewer at work, through Label Studio's own SDK (label-studio-sdk, run by .venv-ls's
Python: the SDK's pins do not fit .venv). Used by test_labelstudio_server.py.

    .venv-ls/bin/python ls_reviewer.py URL TOKEN PROJECT

For the project's tasks in id order: accept the 1st prediction as is, move the 2nd 10 % right,
reject the 3rd, draw nothing on the 4th ("no such object"), leave the rest unreviewed. Prints
``{text: what was done}`` as JSON.
"""

import json
import sys

from label_studio_sdk import LabelStudio

url, token, project = sys.argv[1], sys.argv[2], int(sys.argv[3])
ls = LabelStudio(base_url=url, api_key=token)
tasks = sorted(ls.tasks.list(project=project, fields="all"), key=lambda t: t.id)
done = {}
for k, task in enumerate(tasks[:4]):
    preds = list(ls.predictions.list(task=task.id))
    result = [dict(r) for r in preds[0].result] if preds else []
    if k == 1:
        for r in result:
            r["value"] = dict(r["value"], x=min(r["value"]["x"] + 10, 100 - r["value"]["width"]))
    if k == 2:
        result.append({"from_name": "decision", "to_name": "image", "type": "choices",
                       "value": {"choices": ["reject"]}})
    if k == 3:
        result = []
    ls.annotations.create(task.id, result=result,
                          parent_prediction=preds[0].id if preds else None)
    done[task.data["text"]] = ["accept", "move", "reject", "empty"][k]
print(json.dumps(done))
