"""The tutorial's client script (LMDeploy homework), unchanged except the base URL flag:
list the served model, ask one chat completion, print the reply."""
import argparse

from openai import OpenAI

parser = argparse.ArgumentParser()
parser.add_argument("--base-url", default="http://0.0.0.0:23333/v1")
args = parser.parse_args()

# a local server needs no key; any string will do
client = OpenAI(api_key="YOUR_API_KEY", base_url=args.base_url)

model_name = client.models.list().data[0].id

response = client.chat.completions.create(
    model=model_name,
    messages=[
        {"role": "system", "content": "You are a friendly little assistant who helps people with their questions."},
        {"role": "user", "content": "Tell me a short story about a fox and a watermelon."},
    ],
    temperature=0.8,
    top_p=0.8,
)

print(response.choices[0].message.content)
