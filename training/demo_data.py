"""Embedded demo preference data: a seeded generator of short ``prompt`` / ``chosen`` / ``rejected`` pairs.

All text here was written for this project. Every pair asks an everyday question; ``chosen`` is an on-topic,
helpful, polite answer built from correct tips for that topic, and ``rejected`` is one of several kinds of bad
answer:

- ``wrong``: polite and on-topic in tone but built from incorrect advice;
- ``rude``: insulting or dismissive, with at most one useful tip;
- ``refusal``: declines a harmless question for no reason;
- ``off_topic``: a perfectly good answer to a *different* question;
- ``vague``: non-committal filler that says nothing;
- ``lazy``: tells the user to look it up themselves.

Openers, closers, question phrasings, tip selection and order are all drawn at random, so the same strings rarely
repeat and a model has to pick up the qualities rather than memorize answers. :func:`generate_split` holds out whole
topics for evaluation, so held-out accuracy measures generalization to questions never seen in training.

Texts are short (a prompt plus an answer stays well under 80 word-piece tokens) so the demo trains in minutes on a
laptop CPU.

    python -m training.demo_data demo.jsonl [--n 600] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BAD_KINDS = ("wrong", "rude", "refusal", "off_topic", "vague", "lazy")

# name (used in refusals and rude remarks), question phrasings, correct tips, incorrect tips.
TOPICS: list[dict[str, Any]] = [
    {
        "name": "boiling eggs",
        "questions": ["How do I boil an egg?", "What is the best way to hard boil eggs?", "How long should eggs boil?"],
        "good": [
            "Place the eggs in a pot and cover them with cold water.",
            "Bring the water to a boil, then simmer for about ten minutes.",
            "Move the eggs to a bowl of ice water so they stop cooking.",
            "Older eggs are usually easier to peel than very fresh ones.",
        ],
        "wrong": [
            "Boil the eggs for about an hour so they are safe.",
            "Crack the eggs into the water first so they cook evenly.",
            "Put the eggs in the freezer before boiling to make them peel easily.",
        ],
    },
    {
        "name": "cooking rice",
        "questions": [
            "How do I cook rice on the stove?",
            "How can I make fluffy rice?",
            "What is the ratio of water to rice?",
        ],
        "good": [
            "Rinse the rice until the water runs mostly clear.",
            "Use about two cups of water for every cup of white rice.",
            "Cover the pot and simmer on low heat for around fifteen minutes.",
            "Let the rice rest with the lid on for a few minutes before serving.",
        ],
        "wrong": [
            "Use ten cups of water for each cup of rice.",
            "Stir the rice constantly on high heat with the lid off.",
            "Rice is ready after about one minute in cold water.",
        ],
    },
    {
        "name": "baking bread",
        "questions": [
            "How do I bake simple bread at home?",
            "Why did my bread not rise?",
            "Any tips for baking my first loaf?",
        ],
        "good": [
            "Make sure the yeast is fresh and the water is warm, not hot.",
            "Knead the dough until it feels smooth and stretchy.",
            "Let the dough rise in a warm place until it doubles in size.",
            "Bake until the loaf sounds hollow when you tap the bottom.",
        ],
        "wrong": [
            "Use boiling water so the yeast works faster.",
            "Skip the rising step because yeast works in the oven anyway.",
            "Bread should be baked in a cold oven with the door open.",
        ],
    },
    {
        "name": "watering houseplants",
        "questions": [
            "How often should I water my houseplants?",
            "Why are the leaves on my plant turning yellow?",
            "How do I keep indoor plants healthy?",
        ],
        "good": [
            "Water when the top inch of soil feels dry to the touch.",
            "Use pots with drainage holes so the roots do not sit in water.",
            "Most plants like bright light that is not direct afternoon sun.",
            "Yellow leaves often mean too much water rather than too little.",
        ],
        "wrong": [
            "Water every plant twice a day no matter what.",
            "Keep the soil soaking wet at all times so the roots stay happy.",
            "Plants grow best in a dark closet with no light.",
        ],
    },
    {
        "name": "growing tomatoes",
        "questions": [
            "How do I grow tomatoes in my garden?",
            "When should I plant tomatoes?",
            "Why are my tomato plants not fruiting?",
        ],
        "good": [
            "Plant tomatoes after the last frost when the soil is warm.",
            "Give them at least six hours of direct sun every day.",
            "Water deeply at the base a few times a week instead of a little every day.",
            "Support the stems with stakes or cages as they grow.",
        ],
        "wrong": [
            "Plant tomatoes in the middle of winter for the best harvest.",
            "Tomatoes prefer deep shade and almost no water.",
            "Cut off all the flowers so the plant makes more fruit.",
        ],
    },
    {
        "name": "starting to run",
        "questions": [
            "How should a beginner start running?",
            "How do I build up to running a few miles?",
            "Any advice for a new runner?",
        ],
        "good": [
            "Start with short intervals of running and walking.",
            "Increase your weekly distance slowly, by about ten percent.",
            "Wear comfortable shoes that fit well and support your feet.",
            "Take rest days so your body can recover between runs.",
        ],
        "wrong": [
            "Run as far as you can every day from the very first week.",
            "Rest days are a waste of time and slow your progress.",
            "Running barefoot on gravel is the safest way to begin.",
        ],
    },
    {
        "name": "stretching",
        "questions": [
            "Should I stretch before exercise?",
            "How do I improve my flexibility?",
            "What is a good way to stretch safely?",
        ],
        "good": [
            "Warm up with light movement for a few minutes first.",
            "Hold each gentle stretch for about twenty to thirty seconds.",
            "Breathe slowly and never bounce into a stretch.",
            "Stretch a little most days and flexibility improves over weeks.",
        ],
        "wrong": [
            "Bounce hard into each stretch to make it work faster.",
            "Stretch only until you feel sharp pain, then push further.",
            "Flexibility can only be improved by stretching once a year.",
        ],
    },
    {
        "name": "sleeping better",
        "questions": [
            "How can I fall asleep faster?",
            "Any tips for better sleep?",
            "Why do I wake up tired every morning?",
        ],
        "good": [
            "Go to bed and wake up at the same time every day.",
            "Keep the bedroom dark, quiet and a little cool.",
            "Avoid caffeine in the afternoon and evening.",
            "Put screens away for a while before bed.",
        ],
        "wrong": [
            "Drink a few cups of strong coffee right before bed.",
            "Sleep at a completely different time every night.",
            "Keep bright lights and a loud television on all night.",
        ],
    },
    {
        "name": "drinking water",
        "questions": [
            "How much water should I drink each day?",
            "How can I remember to drink more water?",
            "Is it important to stay hydrated?",
        ],
        "good": [
            "Needs vary, but many adults do well with several glasses a day.",
            "Carry a refillable bottle so water is always close by.",
            "Drink more when it is hot or when you exercise.",
            "Pale yellow urine is a simple sign that you are hydrated.",
        ],
        "wrong": [
            "You should never drink water because food has enough.",
            "Drink ten liters in one hour to cover the whole week.",
            "Only salt water keeps you properly hydrated.",
        ],
    },
    {
        "name": "python lists",
        "questions": [
            "How do I add an item to a list in Python?",
            "How can I sort a list in Python?",
            "What is a list in Python?",
        ],
        "good": [
            "A list is an ordered collection that you can change.",
            "Use the append method to add one item to the end.",
            "Call sorted on the list to get a new sorted copy.",
            "Use the sort method to sort the list in place.",
        ],
        "wrong": [
            "Lists in Python can never be changed after they are created.",
            "Use the delete keyword to add an item to a list.",
            "Python sorts every list automatically when you print it.",
        ],
    },
    {
        "name": "git commits",
        "questions": [
            "How do I save my changes with git?",
            "What does git commit do?",
            "How do I write a good commit message?",
        ],
        "good": [
            "Stage your changes with git add, then run git commit.",
            "A commit records a snapshot of the staged files in history.",
            "Write a short summary line that says what the change does.",
            "Keep each commit focused on one logical change.",
        ],
        "wrong": [
            "Git commit deletes your files from the computer.",
            "Commit messages should always be left empty.",
            "You must email your files to git before you can commit.",
        ],
    },
    {
        "name": "debugging code",
        "questions": [
            "How do I find a bug in my program?",
            "My code crashes, where should I start?",
            "What is a good debugging approach?",
        ],
        "good": [
            "Read the error message and the line number it points to.",
            "Reproduce the problem with the smallest input you can.",
            "Print values or use a debugger to check what the code really does.",
            "Change one thing at a time and test again.",
        ],
        "wrong": [
            "Ignore the error message because it is always wrong.",
            "Rewrite the whole program from scratch whenever there is a bug.",
            "Bugs fix themselves if you restart the computer a few times.",
        ],
    },
    {
        "name": "strong passwords",
        "questions": [
            "How do I make a strong password?",
            "Is it safe to reuse passwords?",
            "How should I manage my passwords?",
        ],
        "good": [
            "Use a long passphrase made of several unrelated words.",
            "Use a different password for every account.",
            "A password manager can create and remember them for you.",
            "Turn on two factor login where it is offered.",
        ],
        "wrong": [
            "Use the same short password everywhere so you never forget it.",
            "Your birthday is the safest password you can pick.",
            "Share your password with friends so they can check it is strong.",
        ],
    },
    {
        "name": "saving money",
        "questions": [
            "How can I start saving money?",
            "What is a simple way to build savings?",
            "How do I stop overspending?",
        ],
        "good": [
            "Write down what you spend for a month to see where it goes.",
            "Set up an automatic transfer to savings on payday.",
            "Build a small emergency fund before anything else.",
            "Wait a day before buying things you did not plan for.",
        ],
        "wrong": [
            "Spend everything on payday so there is nothing to waste later.",
            "Savings only matter if you earn a very large salary.",
            "Borrow as much as possible and keep it in a drawer.",
        ],
    },
    {
        "name": "making a budget",
        "questions": [
            "How do I make a monthly budget?",
            "What should a simple budget include?",
            "Can you help me plan a budget?",
        ],
        "good": [
            "List your monthly income after taxes.",
            "Add up fixed costs like rent, bills and transport.",
            "Set limits for flexible spending such as food and fun.",
            "Review the budget each month and adjust it.",
        ],
        "wrong": [
            "A budget should ignore rent and bills completely.",
            "Plan to spend twice your income every month.",
            "Make a budget once and never look at it again.",
        ],
    },
    {
        "name": "studying for exams",
        "questions": [
            "How should I study for an exam?",
            "What is the best way to remember what I study?",
            "How do I prepare for a test?",
        ],
        "good": [
            "Spread your study over several days instead of cramming.",
            "Test yourself with practice questions rather than rereading.",
            "Take short breaks to keep your focus fresh.",
            "Sleep well the night before the exam.",
        ],
        "wrong": [
            "Stay awake all night before the exam to study everything.",
            "Reading the notes once is all anyone ever needs.",
            "Avoid practice questions because they confuse the memory.",
        ],
    },
    {
        "name": "learning a language",
        "questions": [
            "How can I learn a new language?",
            "What is the fastest way to improve my Spanish?",
            "How do I practice speaking a language?",
        ],
        "good": [
            "Practice a little every day instead of a lot once a week.",
            "Learn the most common words and phrases first.",
            "Listen to podcasts or shows in the language.",
            "Talk with other learners or native speakers, even if you make mistakes.",
        ],
        "wrong": [
            "Only study grammar tables and never listen or speak.",
            "You can only learn a language as a small child.",
            "Practice once a year for a long weekend.",
        ],
    },
    {
        "name": "writing an email",
        "questions": [
            "How do I write a polite work email?",
            "How should I start a formal email?",
            "Any tips for clear emails?",
        ],
        "good": [
            "Use a clear subject line that says what the email is about.",
            "Start with a short greeting and get to the point quickly.",
            "Keep paragraphs short and state any request clearly.",
            "End with a thank you and your name.",
        ],
        "wrong": [
            "Leave the subject line empty so people are curious.",
            "Write the whole email in capital letters to be clear.",
            "Put the main request at the very end after many pages.",
        ],
    },
    {
        "name": "job interviews",
        "questions": [
            "How do I prepare for a job interview?",
            "What should I do before an interview?",
            "How can I feel ready for an interview?",
        ],
        "good": [
            "Read about the company and the role before the day.",
            "Practice answering common questions out loud.",
            "Prepare a few short examples of your past work.",
            "Bring a couple of questions to ask the interviewer.",
        ],
        "wrong": [
            "Do not look at the company at all so you seem natural.",
            "Arrive an hour late to show that you are busy.",
            "Never ask the interviewer any questions.",
        ],
    },
    {
        "name": "public speaking",
        "questions": [
            "How can I get better at public speaking?",
            "How do I calm my nerves before a talk?",
            "Any tips for giving a presentation?",
        ],
        "good": [
            "Rehearse the talk out loud several times.",
            "Know your first few sentences well so you start confidently.",
            "Slow down and take a breath between points.",
            "Look at friendly faces in the audience.",
        ],
        "wrong": [
            "Never practice so your talk sounds fresh.",
            "Speak as fast as you can to finish early.",
            "Read every word from the slides with your back to the audience.",
        ],
    },
    {
        "name": "caring for a dog",
        "questions": [
            "How do I take care of a new puppy?",
            "How often should I walk my dog?",
            "What does a dog need to be happy?",
        ],
        "good": [
            "Most dogs need at least one or two walks every day.",
            "Give fresh water and a balanced dog food.",
            "Use treats and praise to reward good behavior.",
            "Visit a vet for checkups and vaccines.",
        ],
        "wrong": [
            "Dogs never need walks if they have a big bed.",
            "Feed your dog chocolate as a daily treat.",
            "Punish the puppy for hours so it learns faster.",
        ],
    },
    {
        "name": "caring for a cat",
        "questions": ["How do I care for a cat?", "How do I keep my cat healthy?", "What does a new cat owner need?"],
        "good": [
            "Keep the litter box clean and in a quiet place.",
            "Provide fresh water and food made for cats.",
            "Give the cat a scratching post and time to play.",
            "Take the cat to a vet for regular checkups.",
        ],
        "wrong": [
            "Cats only need to eat once a month.",
            "Clean the litter box once a year.",
            "Cats should drink only milk every day.",
        ],
    },
    {
        "name": "packing for travel",
        "questions": [
            "How do I pack light for a trip?",
            "What should I bring on a week long trip?",
            "Any tips for packing a suitcase?",
        ],
        "good": [
            "Make a list and check the weather before you pack.",
            "Choose clothes that mix and match with each other.",
            "Roll clothes to save space and reduce wrinkles.",
            "Keep your documents and medicine in your carry on bag.",
        ],
        "wrong": [
            "Pack your passport in the checked bag at the bottom.",
            "Bring a separate suitcase for every single day.",
            "Never check the weather because it spoils the surprise.",
        ],
    },
    {
        "name": "catching a flight",
        "questions": [
            "How early should I get to the airport?",
            "How do I avoid missing my flight?",
            "What do I need for a flight?",
        ],
        "good": [
            "Arrive about two hours early for most domestic flights.",
            "Check in online and keep your boarding pass ready.",
            "Have your identification with you at security.",
            "Check the gate on the screens because it can change.",
        ],
        "wrong": [
            "Arrive five minutes before departure, flights always wait.",
            "You do not need any identification to board a plane.",
            "Gates never change, so ignore the screens.",
        ],
    },
    {
        "name": "cleaning the kitchen",
        "questions": [
            "How do I keep my kitchen clean?",
            "What is a quick kitchen cleaning routine?",
            "How do I clean a greasy stove?",
        ],
        "good": [
            "Wipe counters after cooking while spills are fresh.",
            "Wash dishes or load the dishwasher every evening.",
            "Warm soapy water removes most grease from the stove.",
            "Take out the trash before it gets full.",
        ],
        "wrong": [
            "Leave dirty dishes for a few weeks so they soak.",
            "Mix bleach and ammonia for a stronger cleaner.",
            "Grease is best removed with more oil.",
        ],
    },
    {
        "name": "doing laundry",
        "questions": [
            "How do I wash clothes without ruining them?",
            "Should I separate my laundry?",
            "How do I keep white shirts white?",
        ],
        "good": [
            "Read the care labels before washing.",
            "Wash dark and bright colors separately from whites.",
            "Use cold water for most everyday clothes.",
            "Do not overload the machine so clothes get clean.",
        ],
        "wrong": [
            "Wash a new red shirt with all your white clothes.",
            "Always use the hottest setting for wool sweaters.",
            "Fill the machine as full as it can possibly go.",
        ],
    },
    {
        "name": "fixing a leaky faucet",
        "questions": [
            "How do I fix a dripping tap?",
            "My faucet keeps leaking, what can I do?",
            "Can I repair a leaky faucet myself?",
        ],
        "good": [
            "Turn off the water supply under the sink first.",
            "A worn washer or cartridge is the usual cause of drips.",
            "Take the handle apart and bring the old part to a store to match it.",
            "Call a plumber if the leak comes from the pipes.",
        ],
        "wrong": [
            "Leave the water on while you take the tap apart.",
            "Hit the faucet with a hammer until it stops.",
            "Cover the leak with tape and never check it again.",
        ],
    },
    {
        "name": "painting a room",
        "questions": ["How do I paint a room?", "What do I need to paint my bedroom?", "How can I paint walls neatly?"],
        "good": [
            "Clean the walls and cover the floor before you start.",
            "Use painter's tape along the edges and trim.",
            "Apply a primer if the wall is new or very dark.",
            "Paint two thin coats and let each one dry.",
        ],
        "wrong": [
            "Paint over dust and dirt because it adds texture.",
            "Use one very thick coat so it never dries.",
            "Close every window and door while painting.",
        ],
    },
    {
        "name": "changing a tire",
        "questions": [
            "How do I change a flat tire?",
            "What should I do when I get a flat?",
            "Can you explain how to change a car tire?",
        ],
        "good": [
            "Park on flat ground and turn on the hazard lights.",
            "Loosen the nuts a little before lifting the car.",
            "Use the jack at the point shown in the manual.",
            "Tighten the nuts in a star pattern and check them later.",
        ],
        "wrong": [
            "Lift the car on a steep hill so the wheel comes off easily.",
            "Remove all the nuts before the car is lifted at all.",
            "Drive a long way on the flat tire to warm it up.",
        ],
    },
    {
        "name": "making coffee",
        "questions": [
            "How do I make good coffee at home?",
            "What is the right amount of coffee per cup?",
            "Why does my coffee taste bitter?",
        ],
        "good": [
            "Use freshly ground beans for the best flavor.",
            "Try about two tablespoons of coffee for each cup of water.",
            "Water just below boiling extracts flavor well.",
            "Bitterness often comes from grinding too fine or brewing too long.",
        ],
        "wrong": [
            "Use the same coffee grounds for a whole week.",
            "Brew coffee with cold tap water for ten seconds.",
            "Bitter coffee means you need even more grounds.",
        ],
    },
    {
        "name": "brewing tea",
        "questions": [
            "How do I make a good cup of tea?",
            "How long should tea steep?",
            "What water temperature is best for tea?",
        ],
        "good": [
            "Black tea usually steeps for three to five minutes.",
            "Green tea tastes better with water that is not boiling.",
            "Remove the leaves when it is ready so it does not turn bitter.",
            "Fresh water makes a cleaner tasting cup.",
        ],
        "wrong": [
            "Steep green tea in boiling water for an hour.",
            "Reuse the same tea bag for a whole month.",
            "Tea only works with ice cold water.",
        ],
    },
    {
        "name": "first aid for burns",
        "questions": [
            "What should I do for a small burn?",
            "How do I treat a minor kitchen burn?",
            "I burned my finger, what now?",
        ],
        "good": [
            "Cool the burn under running cool water for several minutes.",
            "Cover it loosely with a clean dressing.",
            "Do not pop any blisters that form.",
            "See a doctor if the burn is large or looks deep.",
        ],
        "wrong": [
            "Put butter on the burn to seal it.",
            "Press ice directly on the burn for an hour.",
            "Pop every blister right away with a pin.",
        ],
    },
    {
        "name": "handling a cold",
        "questions": [
            "How do I feel better with a cold?",
            "What helps with a common cold?",
            "How can I recover from a cold faster?",
        ],
        "good": [
            "Rest as much as you can and drink plenty of fluids.",
            "Warm drinks and honey can soothe a sore throat.",
            "Wash your hands often so you do not spread it.",
            "See a doctor if a high fever lasts more than a few days.",
        ],
        "wrong": [
            "Run a marathon to sweat the cold out.",
            "Antibiotics cure every cold in one hour.",
            "Stop drinking fluids so the cold dries up.",
        ],
    },
    {
        "name": "reading more books",
        "questions": [
            "How can I read more books?",
            "How do I build a reading habit?",
            "I never finish books, any advice?",
        ],
        "good": [
            "Read a few pages at the same time every day.",
            "Keep a book with you for short waits.",
            "Pick books you actually enjoy, not just ones you think you should read.",
            "It is fine to stop a book that does not hold your interest.",
        ],
        "wrong": [
            "Only read one page a year to avoid getting tired.",
            "Force yourself to finish every boring book first.",
            "Reading is only useful in complete silence at midnight.",
        ],
    },
    {
        "name": "learning guitar",
        "questions": [
            "How do I start learning guitar?",
            "What should a beginner guitarist practice?",
            "How long does it take to learn guitar?",
        ],
        "good": [
            "Learn a few basic chords and switch between them slowly.",
            "Practice for short sessions every day.",
            "Tune the guitar before every practice.",
            "Play simple songs you like to stay motivated.",
        ],
        "wrong": [
            "Never tune the guitar because it ruins the sound.",
            "Practice once a month for ten hours straight.",
            "Start with the hardest solo you can find.",
        ],
    },
    {
        "name": "taking photos",
        "questions": [
            "How can I take better photos with my phone?",
            "Any tips for nicer pictures?",
            "How do I improve my photography?",
        ],
        "good": [
            "Use natural light and face the subject toward it.",
            "Keep the horizon straight and the lens clean.",
            "Try placing the subject a little off center.",
            "Take several shots and keep the best one.",
        ],
        "wrong": [
            "Always shoot straight into the sun for clear faces.",
            "Smudge the lens to make photos sharper.",
            "Take only one picture and never look at it.",
        ],
    },
    {
        "name": "time management",
        "questions": [
            "How can I manage my time better?",
            "How do I stop procrastinating?",
            "How can I get more done each day?",
        ],
        "good": [
            "Write a short list of the most important tasks for the day.",
            "Break big tasks into small steps you can start right away.",
            "Work in focused blocks and take short breaks.",
            "Turn off notifications while you work.",
        ],
        "wrong": [
            "Do every task at the same time so nothing waits.",
            "Keep all notifications on so you never miss anything.",
            "Wait until the last minute because pressure helps.",
        ],
    },
    {
        "name": "making friends",
        "questions": [
            "How do I make friends in a new city?",
            "How can I meet new people?",
            "I feel lonely after moving, any advice?",
        ],
        "good": [
            "Join a club, class or group around something you enjoy.",
            "Say yes to invitations, even small ones.",
            "Ask people questions and listen to their answers.",
            "Keep in touch and suggest meeting again.",
        ],
        "wrong": [
            "Stay home every day and wait for people to knock.",
            "Talk only about yourself when you meet someone.",
            "Never reply to messages so you seem mysterious.",
        ],
    },
    {
        "name": "recycling",
        "questions": [
            "How do I recycle properly?",
            "What can I put in the recycling bin?",
            "How can I recycle more at home?",
        ],
        "good": [
            "Check the local rules, because they differ by city.",
            "Rinse food out of containers before recycling them.",
            "Paper, cardboard, cans and many plastic bottles are usually accepted.",
            "Keep plastic bags out unless your area accepts them.",
        ],
        "wrong": [
            "Put food waste and batteries in the paper bin.",
            "Recycling rules are exactly the same everywhere on earth.",
            "Dirty containers recycle better than clean ones.",
        ],
    },
    {
        "name": "saving energy",
        "questions": [
            "How can I lower my electricity bill?",
            "How do I save energy at home?",
            "What uses the most energy at home?",
        ],
        "good": [
            "Switch to LED bulbs and turn off lights you are not using.",
            "Heating and cooling usually use the most energy.",
            "Seal drafts around windows and doors.",
            "Unplug chargers and devices when they are not in use.",
        ],
        "wrong": [
            "Leave every light on all day to save power.",
            "Open the windows in winter while the heat is on.",
            "Old bulbs use less energy than LED bulbs.",
        ],
    },
    {
        "name": "meal planning",
        "questions": [
            "How do I plan meals for the week?",
            "How can I eat healthier on a budget?",
            "What is a simple meal prep routine?",
        ],
        "good": [
            "Pick a few meals and write a shopping list from them.",
            "Cook a large batch and keep portions for later.",
            "Include vegetables, protein and whole grains.",
            "Check what you already have before shopping.",
        ],
        "wrong": [
            "Shop without a list and buy everything you see.",
            "Eat only candy because it is quick to prepare.",
            "Never check the fridge before going to the store.",
        ],
    },
    {
        "name": "keeping food fresh",
        "questions": [
            "How long do leftovers last?",
            "How should I store leftovers?",
            "How do I keep food from spoiling?",
        ],
        "good": [
            "Put leftovers in the fridge within two hours of cooking.",
            "Most cooked leftovers are good for three to four days.",
            "Use sealed containers and label them with the date.",
            "Freeze food you will not eat soon.",
        ],
        "wrong": [
            "Leave leftovers on the counter overnight to cool.",
            "Cooked chicken stays fresh in the fridge for a month.",
            "Smell is the only safety test you ever need.",
        ],
    },
    {
        "name": "using a spreadsheet",
        "questions": [
            "How do I add up a column in a spreadsheet?",
            "How do I sort data in a spreadsheet?",
            "What is a spreadsheet formula?",
        ],
        "good": [
            "A formula starts with an equals sign.",
            "Use the SUM function with a range to add a column.",
            "Select the data and use the sort option in the data menu.",
            "Freeze the top row so headers stay visible.",
        ],
        "wrong": [
            "Formulas must start with a question mark.",
            "Add a column by typing every total by hand.",
            "Sorting a column deletes the other columns.",
        ],
    },
    {
        "name": "backing up files",
        "questions": [
            "How should I back up my computer?",
            "How do I avoid losing my photos?",
            "What is a good backup plan?",
        ],
        "good": [
            "Keep at least two copies of important files.",
            "Store one copy somewhere else, like a cloud service.",
            "Set backups to run automatically.",
            "Test a restore now and then to be sure it works.",
        ],
        "wrong": [
            "One copy on a single old laptop is more than enough.",
            "Backups are only needed after the files are lost.",
            "Never test backups because it can wear them out.",
        ],
    },
    {
        "name": "birdwatching",
        "questions": [
            "How do I get started with birdwatching?",
            "How can I attract birds to my yard?",
            "What do I need to watch birds?",
        ],
        "good": [
            "A pair of binoculars and a field guide are a good start.",
            "Go out early in the morning when birds are most active.",
            "A feeder and fresh water attract birds to a yard.",
            "Move slowly and stay quiet so you do not scare them.",
        ],
        "wrong": [
            "Shout and clap so the birds come closer.",
            "Birds are only active at midnight.",
            "Feed birds salty chips every day.",
        ],
    },
    {
        "name": "planning a party",
        "questions": [
            "How do I plan a birthday party?",
            "What do I need for a small party?",
            "How can I host a dinner party?",
        ],
        "good": [
            "Set a date and send invitations a couple of weeks ahead.",
            "Ask guests about allergies before planning the food.",
            "Prepare some food the day before to reduce stress.",
            "Make a simple playlist and clear some space to move.",
        ],
        "wrong": [
            "Invite people one hour before the party starts.",
            "Ignore allergies because guests can just skip food.",
            "Cook every dish while guests are waiting at the door.",
        ],
    },
    {
        "name": "writing a resume",
        "questions": [
            "How do I write a good resume?",
            "What should I put on my resume?",
            "How long should a resume be?",
        ],
        "good": [
            "Keep it to one or two pages with clear headings.",
            "List your experience with the most recent job first.",
            "Describe results with numbers where you can.",
            "Tailor it to the job you are applying for.",
        ],
        "wrong": [
            "Make the resume at least thirty pages long.",
            "Leave out all your work experience.",
            "Use the same resume with spelling errors for every job.",
        ],
    },
    {
        "name": "growing herbs",
        "questions": [
            "How do I grow herbs on a windowsill?",
            "Which herbs are easy to grow?",
            "How do I keep basil alive?",
        ],
        "good": [
            "Basil, mint and parsley are easy herbs to start with.",
            "Place them in a sunny window with several hours of light.",
            "Water when the soil starts to feel dry.",
            "Pinch off the tops so the plants grow bushy.",
        ],
        "wrong": [
            "Herbs grow best in a dark cupboard.",
            "Pour a full bucket of water on them every hour.",
            "Never harvest the leaves or the plant will explode.",
        ],
    },
]

OPENERS = [
    "",
    "",
    "Sure!",
    "Good question.",
    "Happy to help.",
    "Of course.",
    "Great question!",
    "Here is what works well.",
    "Glad you asked.",
    "No problem.",
    "Sure, here are a few tips.",
]
CLOSERS = [
    "",
    "",
    "Hope this helps!",
    "Good luck!",
    "Let me know if you have more questions.",
    "Have fun with it!",
    "Feel free to ask if anything is unclear.",
    "You've got this.",
]
WRONG_OPENERS = ["", "", "Sure.", "Easy.", "Here is the trick.", "Everyone knows this.", "Trust me on this."]
PROMPT_PREFIXES = ["", "", "", "Quick question: ", "Hi! ", "Can you help? ", "I need some advice. ", "Hello, "]
RUDE_OPENERS = [
    "Ugh, seriously?",
    "What a dumb question.",
    "Are you kidding me?",
    "Wow, you really don't know this?",
    "Stop wasting my time.",
    "That's a stupid thing to ask.",
    "Honestly, this is embarrassing.",
]
RUDE_CLOSERS = [
    "Now go away.",
    "Figure the rest out yourself.",
    "Don't ask me again.",
    "Whatever.",
    "I can't believe I had to explain that.",
    "Try using your brain next time.",
]
REFUSALS = [
    "I'm sorry, but I can't help with {name}.",
    "I can't answer questions about {name}.",
    "Sorry, I am not able to discuss {name}.",
    "I won't help with that request.",
    "That's not something I can assist with.",
    "I'm afraid I can't provide advice on {name}.",
    "Unfortunately I cannot talk about {name}. Please ask something else.",
]
VAGUE = [
    "It depends on a lot of things.",
    "There are many ways to do it and they all have pros and cons.",
    "Everyone has a different opinion about {name}.",
    "It's complicated, so it really varies.",
    "You could try something and see what happens.",
    "Hard to say. Maybe, maybe not.",
    "Some people do it one way and some do it another way.",
    "Well, {name} is a big topic.",
]
LAZY = [
    "Just search online.",
    "Look it up yourself.",
    "Google it.",
    "Ask someone else.",
    "Read a book about {name}.",
    "There are videos about {name} somewhere.",
    "Why ask me? The answer is online.",
]


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def _good_answer(rng: random.Random, topic: dict[str, Any]) -> str:
    tips = rng.sample(topic["good"], rng.choice((2, 2, 3)))
    return _join(rng.choice(OPENERS), *tips, rng.choice(CLOSERS))


def _bad_answer(rng: random.Random, kind: str, topic: dict[str, Any], pool: Sequence[dict[str, Any]]) -> str:
    name = topic["name"]
    if kind == "wrong":
        tips = rng.sample(topic["wrong"], rng.choice((2, 2, 3)))
        return _join(rng.choice(WRONG_OPENERS), *tips, rng.choice(CLOSERS))
    if kind == "rude":
        tip = rng.choice(topic["good"]) if rng.random() < 0.5 else ""
        return _join(rng.choice(RUDE_OPENERS), tip, rng.choice(RUDE_CLOSERS))
    if kind == "refusal":
        return rng.choice(REFUSALS).format(name=name)
    if kind == "off_topic":
        others = [t for t in pool if t["name"] != name] or [t for t in TOPICS if t["name"] != name]
        return _good_answer(rng, rng.choice(others))
    if kind == "vague":
        lines = rng.sample(VAGUE, 2)
        return _join(*(line.format(name=name) for line in lines), rng.choice(("", "Good luck.")))
    if kind == "lazy":
        return _join(rng.choice(("", "Hmm.", "Meh.")), rng.choice(LAZY).format(name=name))
    raise ValueError(f"unknown bad-answer kind {kind!r}; use one of {BAD_KINDS}")


def _prompt(rng: random.Random, topic: dict[str, Any]) -> str:
    return rng.choice(PROMPT_PREFIXES) + rng.choice(topic["questions"]) + "\n"


def generate_pairs(
    n: int = 600,
    seed: int = 0,
    *,
    topics: Sequence[str] | None = None,
    with_metadata: bool = False,
) -> list[dict[str, Any]]:
    """``n`` preference pairs ``{"prompt", "chosen", "rejected"}``, the same for the same ``n`` and ``seed``.

    ``topics`` restricts the questions (and off-topic answers) to those topic names. ``with_metadata`` adds
    ``topic`` and ``kind`` (the kind of bad answer) to each row; leave it off for training files.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    pool = [t for t in TOPICS if topics is None or t["name"] in set(topics)]
    if not pool:
        raise ValueError(f"no known topics among {list(topics or [])}")
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = pool[i % len(pool)] if i < len(pool) else rng.choice(pool)  # every topic at least once
        kind = BAD_KINDS[rng.randrange(len(BAD_KINDS))]
        row: dict[str, Any] = {
            "prompt": _prompt(rng, topic),
            "chosen": _good_answer(rng, topic),
            "rejected": _bad_answer(rng, kind, topic, pool),
        }
        if with_metadata:
            row.update(topic=topic["name"], kind=kind)
        rows.append(row)
    rng.shuffle(rows)
    return rows


def split_topics(eval_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Topic names split into (train, held-out) at random; the held-out part has at least one topic."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    names = [t["name"] for t in TOPICS]
    random.Random(seed).shuffle(names)
    k = max(1, round(len(names) * eval_fraction))
    return sorted(names[k:]), sorted(names[:k])


def generate_split(
    n: int = 600, seed: int = 0, eval_fraction: float = 0.2, *, with_metadata: bool = False
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, eval) pairs whose topics do not overlap: ``round(n * eval_fraction)`` eval pairs on held-out topics."""
    train_topics, eval_topics = split_topics(eval_fraction, seed)
    n_eval = max(1, round(n * eval_fraction))
    train = generate_pairs(n - n_eval, seed, topics=train_topics, with_metadata=with_metadata)
    held_out = generate_pairs(n_eval, seed + 1, topics=eval_topics, with_metadata=with_metadata)
    return train, held_out


def to_conversational(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same pairs in TRL's conversational shape: a user message as prompt, assistant messages as answers."""
    out = []
    for row in rows:
        converted = dict(row)
        converted["prompt"] = [{"role": "user", "content": row["prompt"].strip()}]
        converted["chosen"] = [{"role": "assistant", "content": row["chosen"]}]
        converted["rejected"] = [{"role": "assistant", "content": row["rejected"]}]
        out.append(converted)
    return out


def all_texts() -> list[str]:
    """Every fixed string the generator composes from (for building test vocabularies)."""
    texts: list[str] = []
    for topic in TOPICS:
        texts += [topic["name"], *topic["questions"], *topic["good"], *topic["wrong"]]
    for group in (OPENERS, CLOSERS, WRONG_OPENERS, PROMPT_PREFIXES, RUDE_OPENERS, RUDE_CLOSERS, REFUSALS, VAGUE, LAZY):
        texts += [t.replace("{name}", "") for t in group]
    return texts


def write_jsonl(path: str | Path, n: int = 600, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in generate_pairs(n, seed):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.demo_data", description=__doc__.split("\n")[0])
    parser.add_argument("output", help="the .jsonl file to write")
    parser.add_argument("--n", type=int, default=600, help="number of pairs (default 600)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    path = write_jsonl(args.output, args.n, args.seed)
    print(f"wrote {args.n} pairs to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
